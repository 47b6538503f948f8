"""scripts/rigl_drop_noise.py: RigL's noisy drop ranking against the library's exact one."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "rigl_drop_noise", os.path.join(ROOT, "scripts", "rigl_drop_noise.py")
)
noise_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(noise_lib)


def test_without_noise_rigl_keeps_what_the_library_keeps():
    """With zero noise RigL's rule (top ``n_keep`` of ``|θ ⊙ M|`` over every entry) is the
    library's drop: the simulation of RigL is right where the two should agree."""
    rng = np.random.default_rng(0)
    theta = rng.normal(size=500).astype(np.float32)
    mask = rng.random(500) < 0.3
    for n_keep in (1, 50, int(mask.sum())):
        rigl = noise_lib.rigl_kept(theta, mask, n_keep, np.zeros(500))
        np.testing.assert_array_equal(rigl, noise_lib.library_kept(theta, mask, n_keep))


def test_noise_moves_weights_near_the_threshold_only():
    """Noise far below the weights' scale changes few kept weights; noise at their scale many,
    and then RigL's ranking over every entry keeps inactive ones too."""
    small = noise_lib.measure(4000, 0.2, 0.3, sigma=0.03, seeds=2)
    large = noise_lib.measure(4000, 0.2, 0.3, sigma=1e-5, seeds=2)
    assert (small["k"], small["d"]) == (800, 240)
    assert small["differ"] < 0.05 * small["d"] < large["differ"]
    assert small["inactive"] == 0 < large["inactive"]


def test_main_prints_a_table(capsys):
    assert noise_lib.main(["--shape", "20,50", "--sigmas", "0.01", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 0.01 | 200 | 60 |" in out
