"""Mask-dynamics statistics (paper Fig. 3) against the reference (issue 2, Options)."""

import jax
import numpy as np
import reference
import tk_harness

import topkast_jax as tk


def _check_stats(stats, ref_state, t):
    names = {1: "w1", 2: "w2"}
    sizes = {i: ref_state.a[i].size for i in names}
    total = sum(sizes.values())
    np.testing.assert_allclose(
        stats["forward_density"], sum(ref_state.a[i].sum() for i in names) / total, rtol=1e-6
    )
    np.testing.assert_allclose(
        stats["backward_density"], sum(ref_state.b[i].sum() for i in names) / total, rtol=1e-6
    )
    changes = []
    for i, name in names.items():
        np.testing.assert_allclose(
            stats[f"forward_density/{name}"], ref_state.a[i].mean(), rtol=1e-6
        )
        np.testing.assert_allclose(
            stats[f"backward_density/{name}"], ref_state.b[i].mean(), rtol=1e-6
        )
        if ref_state.count == 0:
            change = 0.0
        else:
            change = reference.mask_change_fraction(
                ref_state.a_at_last_refresh_before[i], ref_state.a[i]
            )
        changes.append(change)
        np.testing.assert_allclose(
            stats[f"mask_change/{name}"], change, rtol=1e-6, atol=1e-7, err_msg=f"step {t}"
        )
    np.testing.assert_allclose(stats["mask_change"], np.mean(changes), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        stats["reservoir_activated"],
        reference.reservoir_activated(ref_state),
        rtol=1e-6,
        atol=1e-7,
        err_msg=f"step {t}",
    )
    assert "forward_density/b" not in stats and "mask_change/b" not in stats  # dense leaf


def test_mask_stats_match_reference_every_step():
    got, want, _, _ = tk_harness.trajectory("momentum_refresh1")
    mask_stats = jax.jit(tk.mask_stats)
    for t, (snap, (_, ref_state)) in enumerate(zip(got, want, strict=True)):
        stats = mask_stats(snap.state)
        for value in stats.values():
            assert value.shape == () and value.dtype == np.float32
        _check_stats(stats, ref_state, t)
    final = tk.mask_stats(got[-1].state)
    assert float(final["reservoir_activated"]) > 0.0, "test run should activate the reservoir"
    assert any(float(tk.mask_stats(s.state)["mask_change"]) > 0 for s in got)


def test_mask_change_is_kept_between_refreshes():
    got, want, _, _ = tk_harness.trajectory("momentum_refresh3")
    for t, (snap, (_, ref_state)) in enumerate(zip(got, want, strict=True)):
        _check_stats(tk.mask_stats(snap.state), ref_state, t)
    changes = [float(tk.mask_stats(s.state)["mask_change/w1"]) for s in got]
    assert changes[3] == changes[4] == changes[5]
