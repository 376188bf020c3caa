"""Data-parallel training with two CPU processes (torchrun, gloo) matches one process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import genailab
    from genailab.data import simulate
    from genailab.train.distributed import distributed_context

    per_rank_batch, out = int(sys.argv[1]), sys.argv[2]
    adata = simulate(800, 60, n_cell_types=3, n_batches=1, seed=0)
    model = genailab.VAE(adata, likelihood="nb", layer="counts", latent_dim=4, hidden_dims=(32,),
                         norm="layer", dropout=0.0)
    model.fit(epochs=25, batch_size=per_rank_batch, lr=3e-3, seed=0, progress=False,
              early_stopping_patience=None, lr_plateau_patience=None)
    context = distributed_context()
    if context.is_main:
        json.dump({"world_size": context.world_size, "history": model.history,
                   "n_train": model.training_info["n_train"]}, open(out, "w"))
    """
)


def _run(command, tmp_path):
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    _run([sys.executable, str(script), "64", "single.json"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), "32", "ddp.json"], tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    first = single["history"][0]["val_elbo_loss"]
    final_single = single["history"][-1]["val_elbo_loss"]
    final_ddp = ddp["history"][-1]["val_elbo_loss"]
    assert final_single < 0.85 * first and final_ddp < 0.85 * first  # both actually trained
    assert final_ddp == pytest.approx(final_single, rel=0.01)  # same effective batch of 64 cells
    # The training-set metrics are summed over both ranks' shards, not one rank's.
    assert ddp["history"][-1]["train_elbo_loss"] == pytest.approx(single["history"][-1]["train_elbo_loss"], rel=0.03)


PERTURBATION_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from genailab.data.simulate import PerturbationSpec, simulate
    from genailab.perturb import PerturbationModel
    from genailab.train.distributed import distributed_context

    per_rank_batch, out = int(sys.argv[1]), sys.argv[2]
    adata = simulate(600, 50, n_cell_types=2, n_batches=1, seed=0,
                     perturbation=PerturbationSpec(n_drugs=2, doses=(1.0,), control_fraction=0.4))
    model = PerturbationModel(adata, layer="counts", latent_dim=4, hidden_dims=(32,), norm="layer", dropout=0.0)
    model.fit(epochs=12, batch_size=per_rank_batch, lr=3e-3, seed=0, progress=False,
              early_stopping_patience=None, lr_plateau_patience=None)
    if distributed_context().is_main:
        json.dump({"history": model.history}, open(out, "w"))
    """
)


@pytest.mark.slow
def test_perturbation_model_with_its_adversary_under_torchrun_matches_one_process(tmp_path):
    """The drug adversary (gradient reversal) trains under DDP: its gradients are averaged over ranks."""
    script = tmp_path / "perturb.py"
    script.write_text(PERTURBATION_SCRIPT)
    _run([sys.executable, str(script), "64", "single.json"], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), "32", "ddp.json"], tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())["history"]
    ddp = json.loads((tmp_path / "ddp.json").read_text())["history"]
    assert "train_adversary_loss" in ddp[-1]
    assert ddp[-1]["val_elbo_loss"] < 0.9 * ddp[0]["val_elbo_loss"]  # it trained
    assert ddp[-1]["val_elbo_loss"] == pytest.approx(single[-1]["val_elbo_loss"], rel=0.02)
    assert ddp[-1]["train_adversary_loss"] == pytest.approx(single[-1]["train_adversary_loss"], rel=0.1)


@pytest.mark.parametrize("name", ["mps", "xpu", "meta"])
def test_a_device_torch_parses_but_genailab_does_not_run_on_is_refused(name, tmp_path):
    """--device mps/xpu/meta gave torch's RuntimeError or AssertionError as a traceback."""
    from click.testing import CliRunner

    from genailab.cli import main
    from genailab.data import simulate
    from genailab.errors import ConfigError
    from genailab.train.distributed import DistributedContext

    with pytest.raises(ConfigError, match=rf"device='{name}' is not supported: genailab runs on 'cpu' or CUDA"):
        DistributedContext().device(name)
    simulate(60, 12, n_cell_types=2, n_markers=3, seed=0).write_h5ad(tmp_path / "s.h5ad")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "s.h5ad"), "--epochs", "1", "--device", name,
                                       "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 2 and f"--device {name} is not supported" in result.output, result.output
