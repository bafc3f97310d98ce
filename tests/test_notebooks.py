"""Executes every notebook in notebooks/ top to bottom (nbclient) so none of them can rot.

The kernel is started from a kernel spec written here whose argv[0] is `sys.executable`, so the
notebooks run on the very interpreter (and packages) running pytest, never on whatever `python`
a system-wide kernel spec would find; the first injected cell checks that. Cells run with the
repository root as working directory, as the README tells users to.
"""
import json
import os
import pathlib
import sys

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "g2rpo-jax-test"
CELL_TIMEOUT_S = 600


def _kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
  spec_dir = tmp_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "g2rpo_jax tests",
      "language": "python",
  }))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _interpreter_check_cell():
  want = os.path.realpath(sys.executable)
  return nbformat.v4.new_code_cell(
      "import os, sys\n"
      f"assert os.path.realpath(sys.executable) == {want!r}, sys.executable\n")


def _execute(nb, cwd: pathlib.Path, tmp_path: pathlib.Path):
  nb.cells.insert(0, _interpreter_check_cell())
  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S, allow_errors=False,
      resources={"metadata": {"path": str(cwd)}})
  client.execute()
  return nb


def test_notebooks_found():
  assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  n_code = sum(c.cell_type == "code" for c in nb.cells)
  assert n_code, f"{path.name}: no code cells"
  _execute(nb, ROOT, tmp_path)
  # Every code cell ran (an execution count), and none printed an error traceback.
  for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
    assert cell.get("execution_count"), f"{path.name}: code cell {i} did not run"
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", f"{path.name}: code cell {i} raised {out.get('ename')}"


def test_inspect_transforms_setup_from_notebooks_dir(tmp_path):
  """The Colab-style setup cell makes the package importable when run from notebooks/."""
  nb = nbformat.read(NOTEBOOK_DIR / "inspect_transforms.ipynb", as_version=4)
  setup = next(c for c in nb.cells if c.cell_type == "code")
  assert "# !pip install" in setup.source or "# !git clone" in setup.source, (
      "the first code cell should carry the (commented) Colab install line")
  probe = nbformat.v4.new_notebook(cells=[
      setup, nbformat.v4.new_code_cell(
          "import os, g2rpo_jax\n"
          f"assert os.getcwd() == {str(NOTEBOOK_DIR)!r}, os.getcwd()\n"
          f"assert os.path.dirname(g2rpo_jax.__file__) == {str(ROOT / 'g2rpo_jax')!r}\n")])
  _execute(probe, NOTEBOOK_DIR, tmp_path)
