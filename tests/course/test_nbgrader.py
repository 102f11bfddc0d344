"""A course graded with nbgrader on the ``cellblock`` kernel, for real: the C assignment of
examples/grading/ goes through nbgrader's own commands, ``generate_assignment``,
``release_assignment``, each student's ``fetch_assignment`` and ``submit`` (through an exchange
folder of the test's own), ``collect`` and ``autograde``, and the grades are read back from
nbgrader's gradebook. The notebooks run on a real ``cellblock up`` deployment.

Three students: alice writes the teacher's solution, bob a program that passes every test he
can see (``nbgrader validate`` says so) but is wrong for 0 and negative numbers and too slow
for large ones, which the hidden tests catch; carol hands in the notebook as she got it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import upio
from nbformat import NotebookNode
from nbgrader.api import Gradebook
from upio import cellblock_up

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grading"
ASSIGNMENT = NOTEBOOK = "primes"
COURSE = "cellblock-c"
STUB = "    // YOUR CODE HERE"
#: bob's is_prime: right for 1 and small numbers, wrong below 1, and it tries every divisor.
BOB = """\
    if (n == 1)
        return 0;
    for (long d = 2; d < n; d++)
        if (n % d == 0)
            return 0;
    return 1;"""
#: The points of each autograder cell, as the source notebook gives them.
MAX_POINTS = {"test-small": 2.0, "test-edge": 2.0, "test-large": 3.0}
HIDDEN = ("zero-and-negative", "trillion")
STUDENTS = ("alice", "bob", "carol")
#: The first test also waits for the deployment and the course's commands, over a minute.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def kernel_env(
    tmp_path_factory: pytest.TempPathFactory, sandbox_root: Path
) -> Iterator[dict[str, str]]:
    with cellblock_up(tmp_path_factory.mktemp("up"), sandbox_root, uid_base=250000) as state:
        yield upio.kernel_env(state)


@dataclass
class Course:
    root: Path
    env: dict[str, str]
    exchange: Path

    def nbgrader(self, *args: str, cwd: Path | None = None) -> str:
        """Run an nbgrader command (in the course's root unless ``cwd``); what it printed. It
        must succeed."""
        done = subprocess.run(
            [sys.executable, "-m", "nbgrader", *args, f"--Exchange.root={self.exchange}"],
            cwd=cwd or self.root, env=self.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        printed = done.stdout + done.stderr
        assert done.returncode == 0, f"nbgrader {' '.join(args)}:\n{printed}"
        return printed

    def students(self, *args: str, named: bool = False) -> None:
        """The same nbgrader command for each student, from the student's own folder, all at
        once (each command spends seconds importing Jupyter); ``named``: with ``--student``."""
        procs = {}
        for name in STUDENTS:
            argv = [*args, f"--Exchange.root={self.exchange}"] + ([f"--student={name}"] * named)
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "nbgrader", *argv], cwd=self.home(name), env=self.env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        for name, proc in procs.items():
            printed, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{name}: nbgrader {' '.join(args)}:\n{printed}"

    def home(self, student: str) -> Path:
        home = self.root.parent / "students" / student
        home.mkdir(parents=True, exist_ok=True)
        return home

    def gradebook(self) -> Gradebook:
        return Gradebook(f"sqlite:///{self.root / 'gradebook.db'}", course_id=COURSE)


def solution_cell(nb: NotebookNode) -> NotebookNode:
    [found] = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    return found


def grade_cells(nb: NotebookNode) -> dict[str, NotebookNode]:
    return {
        c.metadata.nbgrader.grade_id: c
        for c in nb.cells
        if c.metadata.get("nbgrader", {}).get("grade")
    }


def teachers_solution() -> str:
    """The lines between BEGIN SOLUTION and END SOLUTION of the source notebook."""
    source = nbformat.read(EXAMPLE / "source" / ASSIGNMENT / f"{NOTEBOOK}.ipynb", as_version=4)
    lines = solution_cell(source).source.split("\n")
    begin = next(i for i, line in enumerate(lines) if "BEGIN SOLUTION" in line)
    end = next(i for i, line in enumerate(lines) if "END SOLUTION" in line)
    return "\n".join(lines[begin + 1 : end])


def answer(path: Path, body: str | None) -> None:
    """Write ``body`` where the fetched notebook says YOUR CODE HERE (None: leave it so)."""
    if body is None:
        return
    nb = nbformat.read(path, as_version=4)
    cell = solution_cell(nb)
    assert cell.source.count(STUB + "\n") == 1, cell.source
    cell.source = cell.source.replace(STUB, body)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def course(kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Course:
    """The example course in a temporary folder, its assignment generated and released, and
    fetched by three students (nbgrader's alembic, the database migrations, is a program on
    the venv's PATH)."""
    top = tmp_path_factory.mktemp("course")
    root = top / "course"
    shutil.copytree(EXAMPLE, root)
    env = kernel_env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        # Neither ~/.jupyter/nbgrader_config.py nor ~/.local/share/jupyter/nbgrader_cache.
        "JUPYTER_CONFIG_DIR": str(top / "jupyter-config"),
        "JUPYTER_DATA_DIR": str(top / "jupyter-data"),
    }
    course = Course(root, env, top / "exchange")
    course.exchange.mkdir()
    course.nbgrader("generate_assignment", ASSIGNMENT)
    course.nbgrader("release_assignment", ASSIGNMENT)
    course.students("fetch_assignment", ASSIGNMENT, f"--course={COURSE}")
    return course


@pytest.fixture(scope="module")
def graded(course: Course) -> Course:
    """The students' answers, submitted, collected and autograded."""
    answers = {"alice": teachers_solution(), "bob": BOB, "carol": None}
    for student, body in answers.items():
        answer(course.home(student) / ASSIGNMENT / f"{NOTEBOOK}.ipynb", body)
    course.students("submit", ASSIGNMENT, f"--course={COURSE}", named=True)
    course.nbgrader("collect", ASSIGNMENT)
    course.nbgrader("autograde", ASSIGNMENT)
    return course


def autograded(course: Course, student: str) -> dict[str, NotebookNode]:
    path = course.root / "autograded" / student / ASSIGNMENT / f"{NOTEBOOK}.ipynb"
    return grade_cells(nbformat.read(path, as_version=4))


def error(cell: NotebookNode) -> str:
    [found] = [o for o in cell.outputs if o.output_type == "error"]
    return f"{found.ename}: {found.evalue}"


def table_text(cell: NotebookNode) -> str:
    [table] = [o for o in cell.outputs if o.output_type == "display_data"
               and "cellblock-tests" in o.data.get("text/html", "")]  # fmt: skip
    return str(table.data["text/plain"])


def stream(cell: NotebookNode, name: str) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


# -- the tests -----------------------------------------------------------------------------------


def test_the_release_has_neither_the_solution_nor_the_hidden_tests(course: Course) -> None:
    released = nbformat.read(course.root / "release" / ASSIGNMENT / f"{NOTEBOOK}.ipynb", 4)
    text = "\n".join(c.source for c in released.cells)
    assert STUB in solution_cell(released).source
    assert "SOLUTION" not in text and "HIDDEN" not in text
    assert teachers_solution().strip() not in text
    assert not [name for name in HIDDEN if name in text]
    cells = grade_cells(released)
    assert {k: float(c.metadata.nbgrader.points) for k, c in cells.items()} == MAX_POINTS
    # What the student runs of an autograder cell: its visible tests and the %%run.
    assert cells["test-edge"].source == (
        "%reset tests\n%%test one --points 2\n1\n%%expect\n1 not prime\n%%run\n./primes"
    )
    fetched = course.home("carol") / ASSIGNMENT / f"{NOTEBOOK}.ipynb"
    assert nbformat.read(fetched, 4).cells == released.cells


def test_a_wrong_answer_can_pass_every_visible_test(graded: Course) -> None:
    """``nbgrader validate`` on bob's copy, as he would run it before submitting: his program
    passes the tests he sees (it runs them on the cellblock kernel)."""
    printed = graded.nbgrader("validate", str(graded.home("bob") / ASSIGNMENT / "primes.ipynb"))
    assert "Success! Your notebook passes all the tests." in printed, printed


def test_the_gradebook_has_each_students_points(graded: Course) -> None:
    expected = {
        "alice": MAX_POINTS,
        "bob": {"test-small": 2.0, "test-edge": 0.0, "test-large": 0.0},
        "carol": {"test-small": 0.0, "test-edge": 0.0, "test-large": 0.0},
    }
    with graded.gradebook() as gb:
        for student, points in expected.items():
            cells = {
                cell: gb.find_grade(cell, NOTEBOOK, ASSIGNMENT, student) for cell in MAX_POINTS
            }
            assert {cell: grade.auto_score for cell, grade in cells.items()} == points, student
            assert {cell: grade.max_score for cell, grade in cells.items()} == MAX_POINTS
            submission = gb.find_submission(ASSIGNMENT, student)
            assert (submission.score, submission.max_score) == (sum(points.values()), 7.0)


def test_the_autograded_notebooks_say_why(graded: Course) -> None:
    """The cells the grade comes from: all tests passed, the cell's result its points; or the
    error naming the failing tests, the hidden ones among them."""
    for grade_id, cell in autograded(graded, "alice").items():
        [result] = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert float(result.data["text/plain"]) == MAX_POINTS[grade_id]
    bob = autograded(graded, "bob")
    assert not [o for o in bob["test-small"].outputs if o.output_type == "error"]
    assert error(bob["test-edge"]) == "CellblockTestsFailed: 1 of 2 tests failed: zero-and-negative"
    assert error(bob["test-large"]) == "CellblockTestsFailed: 1 of 2 tests failed: trillion"
    assert "── trillion: ⏱ time limit\n   CPU time limit of 1 s exceeded\n" in table_text(
        bob["test-large"]
    )
    for cell in autograded(graded, "carol").values():
        assert error(cell) == "CellblockStageFailed: compile stage: failed: exit code 1"
        assert "control reaches end of non-void function" in stream(cell, "stderr")
