"""scripts/export.py's core on an ImageNet workdir (issue 12): the latest checkpoint of a tiny
ResNet restored from its config.json and exported as Flax variables (``params`` compact,
``batch_stats`` dense) equal to θ ⊙ A and the batch statistics bit for bit."""

import json
import os

import jax
import numpy as np

import topkast_jax as tk
from configs.imagenet import tiny
from experiments.common import export as export_lib
from experiments.common import workdir as workdir_lib
from experiments.common.checkpoint import Checkpointer
from experiments.imagenet import train


def test_export_workdir_of_an_imagenet_checkpoint(tmp_path):
    config = tiny.get_config("0.8,0.5")
    model = train.create_model(config)
    params = train.abstract_variables(model, config.image_size)["params"]
    tx, _ = train.make_optimizer(config, params, train.sparsify_fn(config))
    state = jax.jit(lambda: train.init_state(model, tx, config))()
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(workdir_lib.config_record(config)))
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(2, state, {"step": 2})
    ckpt.close()

    logged = []
    record = export_lib.export_workdir(str(workdir), str(tmp_path / "out"), log=logged.append)
    assert record["experiment"] == "imagenet" and record["step"] == 2
    assert record["export_bytes"] < record["checkpoint_bytes"]
    assert "checkpoint step 2" in logged[0] and "MiB on disk" in logged[1]
    like = {"params": state["params"], "batch_stats": state["batch_stats"]}
    variables = tk.export.densify(tk.export.load(str(tmp_path / "out"), like=like))
    want = {
        "params": tk.forward_params(state["params"], state["opt_state"]),
        "batch_stats": state["batch_stats"],
    }
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert os.path.isfile(tmp_path / "out" / "export.json")
