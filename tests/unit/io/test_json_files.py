"""Reading JSON documents: every error names the file, the document and the problem."""

from __future__ import annotations

import pytest

from medseg.errors import ConfigError
from medseg.io.json_files import load_json_file


def _as_dict(value):
    if not isinstance(value, dict):
        raise ConfigError(f"expected an object, got {type(value).__name__}")
    return value


def test_load_json_file_names_the_file_and_the_problem(tmp_path):
    p = tmp_path / "doc.json"
    p.write_text('{"a": 1}')
    assert load_json_file(p, _as_dict, "document", ConfigError) == {"a": 1}
    with pytest.raises(ConfigError, match=r"absent\.json: cannot read the document \(.*No such file"):
        load_json_file(tmp_path / "absent.json", _as_dict, "document", ConfigError)
    with pytest.raises(ConfigError, match=r"absent\.json: no document here$"):
        load_json_file(tmp_path / "absent.json", _as_dict, "document", ConfigError, missing="no document here")
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=r"doc\.json: cannot read the document \(not valid JSON: "):
        load_json_file(p, _as_dict, "document", ConfigError)
    p.write_text("[1]")
    with pytest.raises(ConfigError, match=r"doc\.json: expected an object, got list"):
        load_json_file(p, _as_dict, "document", ConfigError)
