"""The notebooks are committed without outputs and run headless against tiny data: 01_stages against a
tiny-model dump, 02_exit against a synthetic evaluation folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from exit_results_data import exit_results  # noqa: F401 (fixture)
from nbclient import NotebookClient
from stage_data import tiny_dump  # noqa: F401 (fixture)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass(frozen=True)
class NotebookCase:
    """How one notebook is run: the environment variable naming its data folder (and the default
    it falls back to), the fixture that builds tiny data, and what its outputs must show."""

    name: str
    variable: str
    default: str
    fixture: str
    texts: tuple[str, ...]
    images: int

    @property
    def path(self) -> Path:
        return NOTEBOOKS / self.name


CASES = [
    NotebookCase("01_stages.ipynb", "DYVTE_STATS", "../runs/demo", "tiny_dump",
                 ("3 samples, 6 layers", "stages of 3 samples"),
                 images=4),  # stage plot, heads heatmap, boundaries, entropy
    NotebookCase("02_exit.ipynb", "DYVTE_EVAL", "../runs/eval", "exit_results",
                 ("10 methods, 12 questions", "categories ['colour', 'count', 'shape']", "dyvte+fastv:1:0.5",
                  "mean_exit_layer"),
                 images=2),  # frontier, exit histogram
]
CASE_IDS = [case.name for case in CASES]


def test_every_notebook_has_a_case():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CASE_IDS)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert [cell.outputs for cell in code] == [[] for _ in code]
    assert [cell.execution_count for cell in code] == [None for _ in code]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_notebook_reads_its_path_from_the_environment(case):
    first_code = next(cell for cell in nbformat.read(case.path, as_version=4).cells if cell.cell_type == "code")
    assert f'os.environ.get("{case.variable}", "{case.default}")' in first_code.source


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_notebook_executes_headless(case, request, monkeypatch):
    monkeypatch.setenv(case.variable, str(request.getfixturevalue(case.fixture)))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(case.path, as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOKS)}}
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources)
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert all(expected in text for expected in case.texts), [t for t in case.texts if t not in text]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == case.images
