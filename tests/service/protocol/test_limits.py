"""The one table of limits, and what is derived from it: OpenAPI and the notebook's names."""

from __future__ import annotations

import pytest

from cellblock.kernel import sections
from cellblock.service.openapi import document
from cellblock.service.protocol import (
    LIMIT_BY_NAME,
    LIMITS,
    RLIMITS,
    SANDBOX_LIMITS,
    SIZE_LIMITS,
    StageLimits,
    Unit,
)


def test_the_table_names_every_field_of_a_stages_limits():
    fields = set(StageLimits.__dataclass_fields__) - {"rlimits"}
    assert set(SANDBOX_LIMITS) == fields
    assert set(RLIMITS) | set(SANDBOX_LIMITS) == {limit.name for limit in LIMITS}
    assert "wall_time" not in SIZE_LIMITS and set(SIZE_LIMITS) < set(SANDBOX_LIMITS)


def test_the_openapi_limits_are_the_tables():
    schema = document()["components"]["schemas"]["StageLimits"]["properties"]
    assert list(schema) == [limit.name for limit in LIMITS]
    assert schema["disk"]["minimum"] == LIMIT_BY_NAME["disk"].minimum == 1
    assert schema["wall_time"]["exclusiveMinimum"] == 0
    assert [s["type"] for s in schema["cpu"]["oneOf"]] == ["integer", "array"]
    assert "oneOf" not in schema["memory"]  # Cellblock's own limits take one value


def test_the_notebook_takes_every_limit_of_the_table():
    assert tuple(limit.name for limit in LIMITS) == sections.STAGE_LIMITS


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: limit.name)
def test_the_notebook_reads_each_limit_in_its_unit(limit):
    one_k = sections.limit_value(limit.name, "1K") if limit.unit is Unit.BYTES else None
    if limit.unit is Unit.BYTES:
        assert one_k == 1024
    elif limit.unit is Unit.MICROSECONDS:
        assert sections.limit_value(limit.name, "2ms") == 2000
    elif limit.unit is Unit.SECONDS:
        assert sections.limit_value(limit.name, "1m") == 60
    else:
        with pytest.raises(ValueError, match="takes no unit"):
            sections.limit_value(limit.name, "1K")
