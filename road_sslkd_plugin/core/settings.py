"""Where the plugin remembers things: per project (QgsProject entries) and per user (QgsSettings).

Project entries, scope ``road_sslkd`` (saved in the .qgz, so a project reopens with its training setup):
    labelled        JSON list of {"image": layer id, "label": layer id}
    test            JSON list of {"image": layer id, "label": layer id}
    unlabelled      JSON list of layer ids
    label_width     road width in map units for vector labels
    preset, steps_scale, device, seed, config_file, extra_args, baselines, weights, bands,
    output_folder, run_name
    last_run_dir    run folder of the last training started from this project
    last_run_state  "running", "done", "cancelled" or "failed"
    model/onnx_path the student chosen with "Use this model" (read it with ``selected_model()``)

User settings, QgsSettings prefix ``road_sslkd/``:
    backend/python      backend interpreter chosen by the user (first place searched)
    backend/base_python Python used to create the managed venv (default: found automatically)
    backend/pip_args    extra pip arguments for "Set up backend" (e.g. an index URL)
    defaults/preset, defaults/device, defaults/steps_scale   defaults for new projects
    model/onnx_path     the last student chosen in any project (fallback of ``selected_model()``)
"""

from __future__ import annotations

import json
from typing import Any, Optional

from qgis.core import QgsProject, QgsSettings

SCOPE = "road_sslkd"
USER_PREFIX = "road_sslkd/"
MODEL_KEY = "model/onnx_path"
BACKEND_PYTHON_KEY = "backend/python"
BASE_PYTHON_KEY = "backend/base_python"
PIP_ARGS_KEY = "backend/pip_args"


def user_value(key: str, default: Any = None) -> Any:
    """A per-user value (QgsSettings ``road_sslkd/<key>``)."""
    return QgsSettings().value(USER_PREFIX + key, default)


def set_user_value(key: str, value: Any) -> None:
    settings = QgsSettings()
    if value is None or value == "":
        settings.remove(USER_PREFIX + key)
    else:
        settings.setValue(USER_PREFIX + key, value)


def project_value(key: str, default: str = "", project: Optional[QgsProject] = None) -> str:
    """A per-project string entry (``road_sslkd/<key>`` in the project file)."""
    value, found = (project or QgsProject.instance()).readEntry(SCOPE, key, default)
    return value if found else default


def set_project_value(key: str, value: Any, project: Optional[QgsProject] = None) -> None:
    project = project or QgsProject.instance()
    if value is None:
        project.removeEntry(SCOPE, key)
    else:
        project.writeEntry(SCOPE, key, str(value))


def project_json(key: str, default: Any, project: Optional[QgsProject] = None) -> Any:
    text = project_value(key, "", project)
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def set_project_json(key: str, value: Any, project: Optional[QgsProject] = None) -> None:
    set_project_value(key, json.dumps(value), project)


def selected_model(project: Optional[QgsProject] = None) -> str:
    """Path of the ONNX student chosen with "Use this model": this project's choice, else the user's last.

    The segmentation tools (Processing, "segment visible extent") read the model from here.
    """
    return project_value(MODEL_KEY, "", project) or str(user_value(MODEL_KEY, "") or "")


def set_selected_model(path: str, project: Optional[QgsProject] = None) -> None:
    set_project_value(MODEL_KEY, path, project)
    set_user_value(MODEL_KEY, path)
