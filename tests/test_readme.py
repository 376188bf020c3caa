"""The README cannot rot: every fenced code block of README.md runs as written.

Rules (all of them are here, so a reader of a failure knows what ran):

* Blocks are the README's fenced blocks whose language is ``python`` or ``bash``; a block without
  a language (the layout tree) is not code.
* Python blocks run in a fresh interpreter in a temporary folder. The blocks of one ``##``
  section run in README order in one interpreter and share its names, as a reader working
  through that section would (Applications: Denoising makes ``adata`` and ``model``, the next
  blocks use them). Each block is its own test; a block fails on any exception.
* Names the README treats as the reader's own inputs, never made in its text, are bound before a
  section runs (``SECTION_INPUTS``), and the files its commands name as the reader's own
  (``data.h5ad``, ``big.h5ad``, ``pbmc.h5ad``, ``reference.h5ad`` and ``query.h5ad``, a 10x folder,
  a featureCounts table, the saved runs ``runs/zinb``, ``runs/pbmc`` and ``runs/reference`` that
  the shell examples apply) are made small in that folder
  first (``user_files``). Everything else a block uses must come from the README itself.
* Bash blocks run command by command (continuation lines joined, comments dropped) through
  ``bash -c`` in one shared temporary folder, in README order, so ``train --out runs/nb`` is there
  for the ``--resume`` and ``embed`` lines after it. Lines are skipped by ``SKIPPED_COMMANDS``:
  installing (``bash scripts/install.sh``, ``pip install``), the test suite itself (``pytest``),
  ``torchrun`` (multi-process; ``tests/train/test_distributed.py`` runs it) and benchmark scripts
  (``benchmarks/*.py``: minutes each; their figures are measured, not examples).
* Sizes: ``GENAILAB_README_SCALE`` (default 0.002; 1 runs the README exactly as written) scales
  epoch counts (``epochs=``, ``--epochs``, ``--sweep-epochs``), checkpoint intervals
  (``checkpoint_every=``, ``--checkpoint-every``, floor 1) and cell counts (``simulate(N, ...``,
  ``--n-cells``, ``--cells``), with floors of 2 epochs and 300 cells; a training command (``train``,
  ``integrate``, ``demo``, ``perturb train``, ``perturb evaluate``) that names no ``--epochs`` nor
  ``--resume`` gets ``--epochs`` scaled from 100. So the whole file runs in minutes on 2 cores.
  Nothing else is changed in the text that runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SCALE = float(os.environ.get("GENAILAB_README_SCALE", "0.002"))
MIN_EPOCHS, MIN_CELLS = 2, 300
TIMEOUT_S = int(os.environ.get("GENAILAB_README_TIMEOUT", "900"))

SKIPPED_COMMANDS = {
    "installs packages": re.compile(r"^(bash scripts/install\.sh|\S*pip install)"),
    "runs the test suite": re.compile(r"^\S*python3? -m pytest"),
    "multi-process launch (tests/train/test_distributed.py runs torchrun)": re.compile(r"^torchrun\b"),
    "benchmark script (minutes; its figures are measured, not an example)": re.compile(r"^\S*python3? benchmarks/"),
}

# README text known to fail as written (issue 15 lists them), each found by a piece of its text
# so that line shifts do not matter: the block (or shell command) is an expected failure with its
# reason while that text is in the README, and runs normally once the text is rewritten. A block
# on this list that passes is reported as XPASS: then take it off the list.
KNOWN_BROKEN: dict[str, str] = {}


def known_broken(code: str) -> str | None:
    for text, reason in KNOWN_BROKEN.items():
        if text in code:
            return reason
    return None


# Names a section's text uses as the reader's own data, bound before its blocks run.
SECTION_INPUTS = {
    "Quick start (Python)": textwrap.dedent(
        """
        import torch
        torch.manual_seed(0)
        x = torch.poisson(torch.full((16, 2000), 2.0))   # "x: (B, 2000) counts"
        c = torch.nn.functional.one_hot(torch.arange(16) % 5, 5).float()  # "c: (B, 5)"
        """
    ),
    "Perturbation and drug-response prediction": "import anndata\nadata = anndata.read_h5ad('data.h5ad')\n",
}


@dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence
    language: str
    section: str  # the enclosing "## " heading
    code: str

    @property
    def id(self) -> str:
        return f"{self.language}-L{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks of a Markdown text, with their language and ``##`` section."""
    blocks, section, fence, start, language, body = [], "", None, 0, "", []
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            opening = re.match(r"^(```+)\s*([\w+-]*)", line)
            if opening:
                fence, start, language, body = opening.group(1), number, opening.group(2).lower(), []
        elif line.strip() == fence:
            blocks.append(Block(start, language, section, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return blocks


def _epochs(n: int) -> int:
    return max(MIN_EPOCHS, round(n * SCALE)) if SCALE < 1 else n


def _every(n: int) -> int:
    return max(1, round(n * SCALE)) if SCALE < 1 else n


TRAINING_COMMAND = re.compile(r"^genailab (train|integrate|demo|perturb train|perturb evaluate)\b")


def with_epochs(command: str) -> str:
    """A training command that names no ``--epochs`` (nor ``--resume``) trains its default number,
    often 100 or more: below scale 1 it gets ``--epochs`` scaled from 100."""
    if SCALE >= 1 or not TRAINING_COMMAND.search(command) or re.search(r"--(epochs|resume)\b", command):
        return command
    return f"{command} --epochs {_epochs(100)}"


def _cells(n: int) -> int:
    return max(MIN_CELLS, round(n * SCALE)) if SCALE < 1 else n


def scaled(code: str) -> str:
    """The block's text with epoch and cell counts scaled by ``GENAILAB_README_SCALE``."""
    code = re.sub(r"\b(epochs=)(\d+)", lambda m: f"{m.group(1)}{_epochs(int(m.group(2)))}", code)
    code = re.sub(r"(--(?:sweep-)?epochs )(\d+)", lambda m: f"{m.group(1)}{_epochs(int(m.group(2)))}", code)
    code = re.sub(r"\b(checkpoint_every=)(\d+)", lambda m: f"{m.group(1)}{_every(int(m.group(2)))}", code)
    code = re.sub(r"(--checkpoint-every )(\d+)", lambda m: f"{m.group(1)}{_every(int(m.group(2)))}", code)
    code = re.sub(r"(--(?:n-)?cells )(\d+)", lambda m: f"{m.group(1)}{_cells(int(m.group(2)))}", code)
    code = re.sub(r"\b(simulate\()(\d+)", lambda m: f"{m.group(1)}{_cells(int(m.group(2)))}", code)
    return code


def shell_commands(code: str) -> list[str]:
    """One string per command: continuation lines joined, comment lines and comments dropped."""
    commands, pending = [], ""
    for line in code.splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = " ".join((pending + line).split(" #")[0].split())
        pending = ""
        if command:
            commands.append(command)
    return commands


def skip_reason(command: str) -> str | None:
    for reason, pattern in SKIPPED_COMMANDS.items():
        if pattern.search(command):
            return reason
    return None


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.language in ("python", "bash")]
PYTHON = [b for b in BLOCKS if b.language == "python"]
BASH = [b for b in BLOCKS if b.language == "bash"]


def _environment() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("PYTHONPATH", None)  # the installed package, as a reader has it
    return env


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    """The reader's own files that README commands name, made small: see the module docstring."""
    folder = tmp_path_factory.mktemp("readme_inputs")
    script = textwrap.dedent(
        """
        import gzip, os
        import numpy as np, scipy.io, scipy.sparse as sp, torch
        import genailab
        from genailab.data import PerturbationSpec, pbmc68k_counts, simulate, write_simulated_h5ad
        torch.set_num_threads(1)
        data = simulate(600, 200, n_cell_types=3, n_batches=2, likelihood="zinb", seed=0,
                        perturbation=PerturbationSpec(n_drugs=3, doses=(0.1, 1.0, 10.0), pair_fraction=0.3))
        data.write_h5ad("data.h5ad")
        write_simulated_h5ad("big.h5ad", 600, 200, chunk_size=300, seed=1)
        pbmc = pbmc68k_counts()
        pbmc.write_h5ad("pbmc.h5ad")
        zinb = genailab.VAE(data, likelihood="zinb", layer="counts", condition_keys=["batch", "cell_type"])
        zinb.fit(epochs=2, seed=0).save("runs/zinb")
        genailab.VAE(pbmc, likelihood="nb", layer="counts").fit(epochs=2, seed=0).save("runs/pbmc")
        # a reference run and a query from a batch it never saw (Map a new dataset)
        mapping = simulate(600, 200, n_cell_types=3, n_batches=3, seed=2)
        reference, query = mapping[mapping.obs["batch"] != "batch_2"].copy(), mapping[mapping.obs["batch"] == "batch_2"].copy()
        reference.write_h5ad("reference.h5ad")
        query.write_h5ad("query.h5ad")
        genailab.VAE(reference, likelihood="nb", layer="counts", condition_keys=["batch"]).fit(epochs=2, seed=0).save(
            "runs/reference")
        # a 10x Cell Ranger folder (matrix.mtx.gz genes x cells, features.tsv.gz, barcodes.tsv.gz)
        os.makedirs("filtered_feature_bc_matrix")
        counts = sp.csr_matrix(pbmc.layers["counts"])
        with gzip.open("filtered_feature_bc_matrix/matrix.mtx.gz", "wb") as handle:
            scipy.io.mmwrite(handle, sp.coo_matrix(counts.T.astype(np.int64)), field="integer")
        with gzip.open("filtered_feature_bc_matrix/features.tsv.gz", "wt") as handle:
            handle.writelines(f"ENSG{i:011d}\\t{g}\\tGene Expression\\n" for i, g in enumerate(pbmc.var_names))
        with gzip.open("filtered_feature_bc_matrix/barcodes.tsv.gz", "wt") as handle:
            handle.writelines(f"{b}\\n" for b in pbmc.obs_names)
        # a featureCounts table: its command line, annotation columns, one column of counts per sample
        bulk = np.random.default_rng(0).poisson(50, size=(100, 4))
        with open("featureCounts.txt", "w") as handle:
            handle.write("# Program:featureCounts v2.0.6; Command:featureCounts -a genes.gtf -o featureCounts.txt\\n")
            handle.write("Geneid\\tChr\\tStart\\tEnd\\tStrand\\tLength\\t" + "\\t".join(f"s{j}.bam" for j in range(4)) + "\\n")
            for i, row in enumerate(bulk):
                handle.write(f"gene{i}\\tchr1\\t{1000 * i}\\t{1000 * i + 500}\\t+\\t500\\t" + "\\t".join(map(str, row)) + "\\n")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=folder, env=_environment(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"making the README's input files failed:\n{done.stderr[-4000:]}"
    return folder


def _copy_inputs(source: Path, target: Path, *, runs: bool) -> None:
    """The reader's files into ``target``; the saved runs only for the shell examples that apply
    them (the Python examples save their own, e.g. ``model.save("runs/pbmc")``)."""
    for item in source.iterdir():
        if item.name == "runs" and not runs:
            continue
        subprocess.run(["cp", "-r", str(item), str(target)], check=True)


_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    blocks = json.load(open(sys.argv[1]))
    results = {}
    namespace = {"__name__": "__main__"}
    for block_id, code in blocks:
        try:
            exec(compile(code, f"README.md {block_id}", "exec"), namespace)
            results[block_id] = None
        except BaseException:
            results[block_id] = traceback.format_exc(limit=6)
        json.dump(results, open(sys.argv[2], "w"))
    """
)


@pytest.fixture(scope="module")
def python_results(user_files, tmp_path_factory):
    """``section -> {block id: error or None}``: a section's Python blocks run in order, in one
    fresh interpreter, the first time one of its blocks is tested."""
    results: dict[str, dict[str, str | None]] = {}

    def run(section: str) -> dict[str, str | None]:
        if section in results:
            return results[section]
        folder = tmp_path_factory.mktemp("readme_python")
        _copy_inputs(user_files, folder, runs=False)
        blocks = [(b.id, scaled(b.code)) for b in PYTHON if b.section == section]
        preamble = SECTION_INPUTS.get(section)
        if preamble:
            blocks.insert(0, ("inputs", preamble))
        (folder / "blocks.json").write_text(json.dumps(blocks))
        (folder / "runner.py").write_text(_RUNNER)
        try:
            done = subprocess.run([sys.executable, "runner.py", "blocks.json", "results.json"], cwd=folder,
                                  env=_environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
            log = done.stderr[-3000:]
        except subprocess.TimeoutExpired:
            log = f"section timed out after {TIMEOUT_S} s"
        found = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else {}
        results[section] = {i: found.get(i, f"did not run (interpreter ended):\n{log}") for i, _ in blocks}
        return results[section]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block(block: Block, python_results):
    section = python_results(block.section)
    if section.get("inputs"):
        pytest.fail(f"binding the section's inputs failed:\n{section['inputs']}")
    error = section[block.id]
    reason = known_broken(block.code)
    if reason and error is not None:
        pytest.xfail(f"known broken ({reason}):\n{error[-600:]}")
    order = list(section)
    earlier = [i for i in order[: order.index(block.id)] if section[i] is not None and i != "inputs"]
    note = f"\n(earlier block(s) of this section failed too: {', '.join(earlier)})" if earlier else ""
    assert error is None, f"README.md line {block.line} ({block.section}) fails as written:\n{error}{note}"


@pytest.fixture(scope="module")
def shell_folder(user_files, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme_shell")
    _copy_inputs(user_files, folder, runs=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_block(block: Block, shell_folder: Path):
    ran, skipped, broken = 0, [], []
    for command in shell_commands(scaled(block.code)):
        reason = skip_reason(command)
        if reason:
            skipped.append(f"{command.split()[0]}...: {reason}")
            continue
        command = with_epochs(command)
        done = subprocess.run(["bash", "-c", command], cwd=shell_folder, env=_environment(), capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        reason = known_broken(command)
        if reason and done.returncode != 0:
            broken.append(f"`{command}`: {reason}")
            continue
        assert done.returncode == 0, (
            f"README.md line {block.line} ({block.section}): `{command}` exited {done.returncode}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
        ran += 1
    if broken:
        pytest.xfail("known broken: " + "; ".join(broken))
    if ran == 0:
        pytest.skip("every command of this block is skipped by rule: " + "; ".join(skipped))


def test_blocks_are_found():
    """The extraction itself, on a small text with every case the README has."""
    text = "# T\n## A\n```python\nx = 1\n```\n```bash\na \\\n  b  # note\n# only a comment\n```\n## B\n```\ntree\n```\n"
    blocks = readme_blocks(text)
    assert [(b.language, b.section, b.line) for b in blocks] == [("python", "A", 3), ("bash", "A", 6), ("", "B", 12)]
    assert shell_commands(blocks[1].code) == ["a b"]
    assert skip_reason("torchrun --standalone -m genailab train x") is not None
    assert skip_reason("genailab train data.h5ad") is None
    if SCALE < 1:
        assert with_epochs("genailab perturb evaluate d.h5ad --out s.csv").endswith(f"--epochs {_epochs(100)}")
        assert with_epochs("genailab train d.h5ad --epochs 5") == "genailab train d.h5ad --epochs 5"
        assert "epochs=2" in scaled("model.fit(epochs=100)") and "--cells 2000" in scaled("--cells 1000000")
    assert len(BLOCKS) > 10, "README.md should have code blocks; were they renamed?"
