"""notebooks/deepjax_tour.ipynb: committed without outputs, and it runs top to bottom (a few
training steps, CPU) in a Jupyter kernel of this interpreter."""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "deepjax_tour.ipynb")
KERNEL = "deepjax-test"


def test_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and
           (cell.outputs or cell.execution_count is not None)]
  assert not dirty, f"code cells {dirty} hold outputs: clear them before committing"


@pytest.mark.slow
def test_tour_runs(tmp_path, monkeypatch):
  # A kernelspec of this interpreter, found first on JUPYTER_PATH; the user's config is untouched.
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": KERNEL, "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("DEEPJAX_TOUR_STEPS", "3")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")          # one CPU device, not conftest's eight
  monkeypatch.setenv("TMPDIR", str(tmp_path))   # the notebook's training workdir
  run_dir = tmp_path / "run"
  run_dir.mkdir()

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                          resources={"metadata": {"path": str(run_dir)}}).execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  # loss curves, expert load, domain x expert routing, MLA vs MHA cache
  assert len(images) == 4, [o.output_type for o in outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "restored step 3" in text
  assert "'12+34=" in text                       # the generation printed its prompts
