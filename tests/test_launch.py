"""launch.grid builds one command per grid point."""

from pathlib import Path

import pytest

from launch.grid import commands, parse_grid


def test_grid_is_a_product_of_axes():
    points = parse_grid(["a=1,2", "b=x,y,z"])
    assert len(points) == 6
    assert points[0] == [("a", "1"), ("b", "x")]
    assert parse_grid([]) == [[]]


def test_grid_commands_name_workdirs_and_overrides():
    cmds = commands("lds", "cfg.py:tiny", ["seed=0,1"], Path("/tmp/root"))
    assert [w.name for w, _ in cmds] == ["seed=0", "seed=1"]
    assert "--config.seed=1" in cmds[1][1] and "--workdir=/tmp/root/seed=1" in cmds[1][1]


def test_bad_grid_entry_is_named():
    with pytest.raises(ValueError, match="key=v1,v2"):
        parse_grid(["novalue"])
