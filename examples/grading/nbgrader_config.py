"""nbgrader's configuration for a course graded on the ``cellblock`` kernel (see the README,
"Grading a course with Cellblock and nbgrader"). Run nbgrader's commands in this folder, the
course's root: source/ holds the teacher's notebooks."""

c = get_config()  # noqa: F821 (nbgrader's config loader defines it)

c.CourseDirectory.course_id = "cellblock-c"

# The notebooks' kernelspec says language "cellblock": what replaces a solution region there.
# The region sits inside a C file of a %%files section, so the stub is a C comment; the code
# around it (here a function without its return) does not compile until the student writes it.
c.ClearSolutions.code_stub = {"cellblock": "// YOUR CODE HERE"}

# A cell runs a compile and a sandboxed run per test on the Cellblock service: more than
# nbgrader's 30 seconds when the service is busy.
c.Execute.timeout = 300
