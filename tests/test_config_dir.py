"""The configs come from the checkout whose code runs, even when another checkout is installed in editable mode."""
from pathlib import Path

import fdistill
from fdistill.config import config_dir


def test_config_dir_is_the_conf_beside_the_imported_package():
    assert config_dir() == Path(fdistill.__file__).resolve().parent.parent / "conf"
