"""examples/quickstart.ipynb runs top to bottom (nbclient), on a tiny random model."""

from __future__ import annotations

import pathlib

import pytest
from process_util import child_env

NOTEBOOK = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    # Like papermill: replace the cell tagged "parameters". No download in tests.
    [parameters] = [
        c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])
    ]
    parameters.source = 'MODEL = "tiny-vit"\nWEIGHTS = None'
    # The kernel imports this checkout, with the session's XLA flags and compilation
    # cache; one CPU device is enough here.
    for name, value in child_env(devices=None).items():
        monkeypatch.setenv(name, value)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    outputs = {
        index: cell.get("outputs", []) for index, cell in enumerate(notebook.cells)
    }
    text = "".join(
        out.get("text", "") for cell_outputs in outputs.values() for out in cell_outputs
    )
    assert "nothing (all present)" in text  # the install cell found everything
    assert "(6, 64) (6, 64)" in text  # embeddings of the six photos and descriptions
    for name in ("astronaut", "coffee", "cat", "rocket", "camera man", "coins"):
        assert f"{name:>10}: " in text  # a zero-shot line per photo
    images = [
        out
        for cell_outputs in outputs.values()
        for out in cell_outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 2  # the photos and the similarity heat map
