"""SAE / transcoder training: feature recovery on planted dictionaries, scaling fold-back, exact resume, export."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from actstore.workers.sae.metrics import evaluate
from actstore.workers.sae.model import SAEConfig, SparseAutoencoder, _JumpReLU, _Step, geometric_median
from actstore.workers.sae.saelens import load_saelens, save_saelens
from actstore.workers.sae.sparse import batch_topk, sampled_dot, scatter_rows, select_batch_topk
from actstore.workers.sae.training import TrainConfig, train

# Planted data is scaled and shifted far from the unit-norm regime so that a missing fold-back shows up.
SCALE, OFFSET = 40.0, 5.0


def planted_dictionary(d: int, n_features: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dic = torch.randn(n_features, d, generator=gen)
    return dic / dic.norm(dim=1, keepdim=True)


def planted_batches(dic: torch.Tensor, n_active: int, batch: int, seed: int,
                    n_batches: int | None = None) -> Iterator[torch.Tensor]:
    """Each token: n_active dictionary features (drawn with replacement), magnitudes uniform in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    n = dic.shape[0]
    i = 0
    while n_batches is None or i < n_batches:
        idx = torch.randint(0, n, (batch, n_active), generator=gen)
        mags = 0.5 + torch.rand(batch, n_active, generator=gen)
        codes = torch.zeros(batch, n).scatter_add_(1, idx, mags)
        yield (codes @ dic) * SCALE + OFFSET
        i += 1


def exact_width_batches(dic: torch.Tensor, batch: int, seed: int, n_batches: int | None = None,
                        n_active: int = 4) -> Iterator[torch.Tensor]:
    """The issue-19 planted setting: n_active distinct features per token, magnitudes uniform in [0.5, 2]."""
    gen = torch.Generator().manual_seed(seed)
    n = dic.shape[0]
    i = 0
    while n_batches is None or i < n_batches:
        idx = torch.rand(batch, n, generator=gen).argsort(1)[:, :n_active]
        codes = torch.zeros(batch, n).scatter_(1, idx, 0.5 + 1.5 * torch.rand(batch, n_active, generator=gen))
        yield (codes @ dic) * SCALE + OFFSET
        i += 1


def recovered_fraction(sae: SparseAutoencoder, dic: torch.Tensor, cos_min: float = 0.9) -> float:
    rows = sae.W_dec.detach()
    rows = rows / rows.norm(dim=1, keepdim=True)
    return float(((dic @ rows.T).max(dim=1).values > cos_min).float().mean())


def quick_cfg(**kw) -> TrainConfig:
    base = {"batch_size": 1024, "threads": 1, "device": "cpu", "log_every": 10**9}
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({"d_in": 8, "architecture": "gated"}, "architecture"),
    ({"d_in": 8, "k": 0}, "k"),
    ({"d_in": 8, "expansion": 2, "k": 17}, "k"),
    ({"d_in": 8, "skip": True}, "skip"),
    ({"d_in": 8, "d_out": 4}, "d_out"),
    ({"d_in": 8, "b_dec_init": "median"}, "b_dec_init"),
    ({"d_in": 8, "l1_coefficient": -1.0}, "l1_coefficient"),
    ({"d_in": 8, "matryoshka_widths": [4]}, "matryoshka_widths"),
    ({"d_in": 8, "architecture": "matryoshka_batchtopk", "matryoshka_widths": [8, 4]}, "matryoshka_widths"),
    ({"d_in": 8, "architecture": "matryoshka_batchtopk", "matryoshka_widths": []}, "matryoshka_widths"),
    ({"d_in": 8, "architecture": "matryoshka_batchtopk", "expansion": 2, "k": 4, "matryoshka_widths": [4, 17]},
     "matryoshka_widths"),
])
def test_sae_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SAEConfig.{field}"):
        SAEConfig(**kwargs)


def test_train_config_validation_and_documented_defaults():
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="TrainConfig.normalize_to"):
        TrainConfig(normalize_to="unit")
    cfg = TrainConfig()
    assert cfg.batch_size == 4096
    assert cfg.resolved_lr(16384) == pytest.approx(1.6e-3)
    assert cfg.resolved_lr(4096) == pytest.approx(3.2e-3)  # 1/sqrt(n_latents) scaling
    # Dead window: 256 average firing intervals (d_sae / k tokens), within [batch_size, training_tokens // 20].
    assert cfg.resolved_dead_window(16384, 32) == 256 * 512
    assert cfg.resolved_dead_window(64, 32) == cfg.batch_size
    assert TrainConfig(training_tokens=2**20).resolved_dead_window(2**20, 1) == 2**20 // 20
    assert TrainConfig(dead_window_tokens=7).resolved_dead_window(16384, 32) == 7
    steps = cfg.total_steps
    assert cfg.lr_at(0, 1.0) < cfg.lr_at(cfg.resolved_warmup(), 1.0) == 1.0
    assert cfg.lr_at(steps - 1, 1.0) < 0.01


# ---------------------------------------------------------------------------------- feature recovery
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_family_recovers_planted_features(arch):
    dic = planted_dictionary(64, 128)
    cfg = SAEConfig(d_in=64, architecture=arch, expansion=4, k=4)
    result = train(planted_batches(dic, 4, 1024, seed=2), cfg, quick_cfg(training_tokens=640 * 1024, seed=0))
    sae = result.sae
    assert recovered_fraction(sae, dic) >= 0.9
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(cfg.d_sae))
    # Raw, unscaled held-out data: only a correctly folded-back SAE reconstructs it.
    metrics = evaluate(sae, planted_batches(dic, 4, 1000, seed=99, n_batches=3))
    assert metrics["fvu"] < 0.15
    assert metrics["l0"] == pytest.approx(4.0, abs=0.5)
    sample = next(planted_batches(dic, 4, 4096, seed=123))
    assert result.metrics["scale_in"] == pytest.approx(8.0 / float(sample.norm(dim=1).mean()), rel=0.02)
    if arch == "batchtopk":
        assert sae.threshold is not None and float(sae.threshold[0]) > 0


def _exact_width_run(d: int, n_features: int, tokens: int, arch: str = "topk") -> tuple[float, float]:
    """(recovered fraction, held-out FVU) of an SAE with exactly as many latents as planted features, trained
    with the defaults (only expansion, k, training_tokens, seed given, as the defaults contract says)."""
    dic = planted_dictionary(d, n_features)
    cfg = SAEConfig(d_in=d, architecture=arch, expansion=n_features // d, k=4)
    result = train(exact_width_batches(dic, 4096, seed=2), cfg,
                   TrainConfig(training_tokens=tokens, seed=0, threads=1, device="cpu", log_every=10**9))
    fvu = evaluate(result.sae, exact_width_batches(dic, 2000, seed=99, n_batches=2))["fvu"]
    return recovered_fraction(result.sae, dic), fvu


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_exact_width_sae_recovers_planted_features(arch):
    """128 features in 32 dims, an SAE of exactly 128 latents: no spare latent may be wasted."""
    recovered, fvu = _exact_width_run(32, 128, 1_000_000, arch)
    assert recovered >= 0.9
    assert fvu < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_exact_width_sae_recovers_planted_features_full_size(arch):
    """The issue-19 setting: d 64, 256 features, 256 latents, k 4, 3M tokens (TopK 80.5% with the first
    defaults; BatchTopK 77% with Adam's betas at torch's (0.9, 0.999); 100% for both with (0.8, 0.9))."""
    recovered, fvu = _exact_width_run(64, 256, 3_000_000, arch)
    assert recovered >= 0.9
    assert fvu < 0.15


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_relu_and_jumprelu_train_to_low_fvu(arch):
    dic = planted_dictionary(32, 64)
    cfg = SAEConfig(d_in=32, architecture=arch, expansion=4)
    result = train(planted_batches(dic, 3, 1024, seed=5), cfg, quick_cfg(training_tokens=400 * 1024, seed=1))
    metrics = evaluate(result.sae, planted_batches(dic, 3, 1000, seed=98, n_batches=3))
    assert metrics["fvu"] < 0.2
    assert metrics["l0"] < 0.5 * cfg.d_sae  # the sparsity penalty did its job
    if arch == "jumprelu":
        torch.testing.assert_close(result.sae.W_dec.norm(dim=1), torch.ones(cfg.d_sae))


def test_skip_transcoder_learns_a_linear_map_with_separate_scales():
    dic = planted_dictionary(16, 32)
    mix = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))

    def pairs(seed: int, n: int | None = None):
        for x in planted_batches(dic, 2, 512, seed, n):
            yield x, (x @ mix) * 100.0  # output lives on a very different scale from the input

    cfg = SAEConfig(d_in=16, architecture="topk", expansion=2, k=2, transcoder=True, skip=True, d_out=24)
    result = train(pairs(0), cfg, quick_cfg(batch_size=512, training_tokens=200 * 512))
    assert result.metrics["scale_out"] < result.metrics["scale_in"] / 50
    assert evaluate(result.sae, pairs(7, 2))["fvu"] < 0.1


# -------------------------------------------------------------------------------- parameter surgery
def _randomised(cfg: SAEConfig, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        if cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
            sae.running_threshold.fill_(0.7)
    return sae.eval()


@pytest.mark.parametrize("cfg", [
    SAEConfig(d_in=12, architecture="topk", expansion=3, k=5),
    SAEConfig(d_in=12, architecture="batchtopk", expansion=3, k=5),
    SAEConfig(d_in=12, architecture="matryoshka_batchtopk", expansion=3, k=5, matryoshka_widths=[4, 12]),
    SAEConfig(d_in=12, architecture="relu", expansion=3),
    SAEConfig(d_in=12, architecture="jumprelu", expansion=3),
    SAEConfig(d_in=12, architecture="jumprelu", expansion=3, transcoder=True, skip=True, d_out=7),
], ids=["topk", "batchtopk", "matryoshka", "relu", "jumprelu", "skip-transcoder"])
def test_fold_scale_reproduces_the_scaled_model_on_raw_inputs(cfg):
    scaled = _randomised(cfg)
    raw = copy.deepcopy(scaled)
    a, b = (3.7, 0.02) if cfg.transcoder else (3.7, 3.7)
    raw.fold_scale_(a, b)
    x = 5 * torch.randn(64, 12, generator=torch.Generator().manual_seed(9))
    y_scaled, f_scaled = scaled(x * a)
    y_raw, f_raw = raw(x)
    assert (f_scaled != 0).sum() > 0
    torch.testing.assert_close(f_raw, f_scaled / b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_raw, y_scaled / b, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(raw.W_dec, scaled.W_dec)  # decoder directions untouched


def test_decoder_gradient_projection_and_renormalisation():
    sae = SparseAutoencoder(SAEConfig(d_in=10, expansion=2, k=3))
    x = torch.randn(32, 10)
    loss, _ = sae.training_loss(x, x)
    loss.backward()
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))


# ------------------------------------------------------------------------------- sparse training path
def _perturbed_pair(cfg: SAEConfig) -> tuple[SparseAutoencoder, SparseAutoencoder]:
    """Two identical SAEs with non-trivial biases (so b_dec's path through the encoder is exercised)."""
    sae = SparseAutoencoder(cfg, seed=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return sae, copy.deepcopy(sae)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("dead_fraction", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_sparse_path_equals_dense_reference(arch, dead_fraction, kind):
    transcoder = kind == "skip_transcoder"
    cfg = SAEConfig(d_in=12, architecture=arch, expansion=6, k=3, aux_k=5, transcoder=transcoder,
                    skip=transcoder, d_out=10 if transcoder else None)
    sparse, dense = _perturbed_pair(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen)
    y = torch.randn(64, cfg.d_target, generator=gen) if transcoder else x
    dead = torch.rand(cfg.d_sae, generator=gen) < dead_fraction
    loss_s, stats_s = sparse.training_loss(x, y, dead=dead)
    loss_d, stats_d = dense.training_loss(x, y, dead=dead, sparse=False)
    torch.testing.assert_close(loss_s, loss_d)
    for key in ("rec", "aux", "l0"):
        torch.testing.assert_close(stats_s[key], stats_d[key])
    assert torch.equal(stats_s["fired"], stats_d["fired"])
    if dead_fraction > 0:
        assert float(stats_s["aux"]) > 0  # AuxK really ran
    loss_s.backward()
    loss_d.backward()
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert p_s.grad is not None, name
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-5, atol=1e-6, msg=name)
    if arch != "topk":
        torch.testing.assert_close(sparse.running_threshold, dense.running_threshold)


def test_matryoshka_loss_adds_each_prefix_reconstruction():
    """The Matryoshka loss is BatchTopK's plus, per inner prefix, the error of decoding its latents alone
    (written out here with an explicit mask); AuxK off so the sum has nothing else in it."""
    cfg = SAEConfig(d_in=10, architecture="matryoshka_batchtopk", expansion=4, k=3, aux_k=0,
                    matryoshka_widths=[5, 15])
    assert cfg.matryoshka_widths_resolved == [5, 15, 40]
    sae, plain = _perturbed_pair(cfg)
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(3))
    loss, stats = sae.training_loss(x, x, sparse=True)
    f = batch_topk(plain.pre_acts(x), 3)
    expected = 0.0
    for width in (5, 15, 40):
        x_hat = (f * (torch.arange(40) < width)) @ plain.W_dec + plain.b_dec
        expected = expected + (x_hat - x).pow(2).sum(-1).mean() / 10
    torch.testing.assert_close(loss, expected)
    full = (f @ plain.W_dec + plain.b_dec - x).pow(2).sum(-1).mean() / 10  # progress reports the full width
    torch.testing.assert_close(stats["rec"], full.detach())
    assert SAEConfig(d_in=64, architecture="matryoshka_batchtopk", k=4).matryoshka_widths_resolved == [32, 128, 512]
    assert SAEConfig(d_in=8, architecture="matryoshka_batchtopk", matryoshka_widths=[4, 16], k=4,
                     expansion=2).matryoshka_widths_resolved == [4, 16]


def _hierarchy(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """8 parent and 8 x 3 child directions, all orthonormal in 32 dims."""
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(seed)))
    return q[:8], q[8:].reshape(8, 3, 32)


def hierarchy_batches(parents: torch.Tensor, children: torch.Tensor, batch: int, seed: int,
                      n_batches: int | None = None) -> Iterator[torch.Tensor]:
    """Each parent fires with probability 0.4; a firing parent has one of its children with probability 0.7
    (a child never fires without its parent). Magnitudes uniform in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    n_par, n_child = children.shape[:2]
    i = 0
    while n_batches is None or i < n_batches:
        par = (torch.rand(batch, n_par, generator=gen) < 0.4).float()
        has_child = par * (torch.rand(batch, n_par, generator=gen) < 0.7).float()
        which = torch.randint(0, n_child, (batch, n_par), generator=gen)
        child_dirs = children[torch.arange(n_par).expand(batch, n_par), which]  # (batch, n_par, d)
        x = (par * (0.5 + torch.rand(batch, n_par, generator=gen))) @ parents
        x = x + torch.einsum("bp,bpd->bd", has_child * (0.5 + torch.rand(batch, n_par, generator=gen)), child_dirs)
        yield x * SCALE + OFFSET
        i += 1


def _parent_share_of_child_latents(sae: SparseAutoencoder, parents: torch.Tensor,
                                   children: torch.Tensor) -> tuple[float, float]:
    """(mean cosine of each child's best-matching decoder row with the child, mean cosine of that row with the
    child's parent): feature absorption shows as child latents that carry their parent's direction."""
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    flat = children.reshape(-1, children.shape[-1])
    best = rows[(flat @ rows.T).argmax(1)]
    own = (best * flat).sum(1)
    parent = (best * parents.repeat_interleave(children.shape[1], 0)).sum(1)
    return float(own.mean()), float(parent.mean())


def test_matryoshka_keeps_parents_out_of_child_latents():
    """A planted hierarchy (children only fire with their parent) at a tight sparsity budget: BatchTopK absorbs
    each parent into its children's latents (their decoders lean towards the parent), Matryoshka, whose first
    16 latents must reconstruct alone, learns the parents there and keeps the children pure."""
    parents, children = _hierarchy()
    shares = {}
    for arch, extra in (("batchtopk", {}), ("matryoshka_batchtopk", {"matryoshka_widths": [16]})):
        cfg = SAEConfig(d_in=32, architecture=arch, expansion=2, k=4, **extra)
        result = train(hierarchy_batches(parents, children, 1024, seed=2), cfg,
                       quick_cfg(training_tokens=600 * 1024, seed=0))
        shares[arch] = _parent_share_of_child_latents(result.sae, parents, children)
    (plain_own, plain_parent), (matry_own, matry_parent) = shares["batchtopk"], shares["matryoshka_batchtopk"]
    assert plain_parent > 0.4, shares  # the baseline really absorbs: the test can tell the two apart
    assert matry_parent < 0.2 and matry_own > 0.85, shares
    assert matry_own > plain_own + 0.05, shares


def test_batch_topk_selection_is_exact_with_a_dominant_token():
    """One huge token takes more than the 4k per-token candidates: the exact fallback must kick in."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(32, 64, generator=gen)
    z[4] = z[4].abs() * 100
    sel = select_batch_topk(z, k=2)
    assert int((sel.tok == 4).sum()) > 8  # more than c = 4k entries from one token
    f = torch.zeros_like(z)
    f[sel.tok, sel.idx] = torch.relu(sel.vals)
    assert torch.equal(f, batch_topk(z, 2))
    assert torch.equal(sel.offsets, torch.cumsum(torch.bincount(sel.tok, minlength=32), 0)
                       - torch.bincount(sel.tok, minlength=32))


def test_sparse_kernels_match_their_dense_formulas():
    gen = torch.Generator().manual_seed(4)
    rows, table = torch.randn(20, 8, generator=gen), torch.randn(30, 8, generator=gen)
    idx, tok = torch.randint(0, 30, (100,), generator=gen), torch.randint(0, 20, (100,), generator=gen)
    weight = torch.randn(100, generator=gen)
    dots = sampled_dot(rows, table, idx, tok, torch.arange(20))
    torch.testing.assert_close(dots, (rows[tok] * table[idx]).sum(-1))
    expected = torch.zeros(30, 8).index_add_(0, idx, weight[:, None] * rows[tok])
    torch.testing.assert_close(scatter_rows(idx, tok, weight, rows, 30), expected)


def test_bf16_selection_keeps_float32_values_and_gradients():
    """With a bf16 selection GEMM, the chosen entries' values and gradients are still the float32 ones."""
    cfg = SAEConfig(d_in=16, expansion=4, k=4)
    sparse, dense = _perturbed_pair(cfg)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(5))
    loss_s, _ = sparse.training_loss(x, x, select_dtype=torch.bfloat16)
    loss_s.backward()
    # Dense float32 reference on exactly the latents the bf16 selection GEMM picks.
    z = dense.pre_acts(x)
    with torch.no_grad():
        z_bf16 = torch.addmm(dense.b_enc.bfloat16(), (x - dense.b_dec).bfloat16(), dense.W_enc.bfloat16())
        sel = z_bf16.topk(4, dim=-1, sorted=False).indices
    f_ref = torch.zeros_like(z).scatter(-1, sel, torch.relu(z.gather(-1, sel)))
    x_hat = dense.decode(f_ref)
    loss_d = (x_hat - x).pow(2).sum(-1).mean() / 16
    loss_d.backward()
    torch.testing.assert_close(loss_s, loss_d)
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_jumprelu_straight_through_gradients():
    z = torch.tensor([[0.42, 0.55, 1.0], [0.58, 0.9, -1.0]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    bw = 0.2
    out = _JumpReLU.apply(z, theta, bw)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.55, 1.0], [0.58, 0.9, 0.0]]))
    out.sum().backward()
    # d/dz is the step; d/dtheta = -(theta/bw) * #{|z - theta| < bw/2} per latent.
    assert torch.equal(z.grad, torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([-2 * 0.5 / bw, -0.5 / bw, 0.0]))
    theta.grad = None
    z2 = z.detach().clone().requires_grad_(True)
    _Step.apply(z2, theta, bw).sum().backward()
    assert z2.grad is None or torch.count_nonzero(z2.grad) == 0
    torch.testing.assert_close(theta.grad, torch.tensor([-2 / bw, -1 / bw, 0.0]))


def test_geometric_median_beats_the_mean_and_is_stationary():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 5, generator=gen), 100 + torch.randn(20, 5, generator=gen)])
    gm = geometric_median(x, iters=200)

    def cost(y):
        return float((x.double() - y.double()).norm(dim=1).sum())

    assert cost(gm) < cost(x.mean(0))
    for _ in range(20):  # no small step in a random direction improves it
        assert cost(gm) <= cost(gm + 1e-2 * torch.randn(5, generator=gen)) + 1e-6
    assert gm.norm() < 3  # the 20 outliers at ~100 barely move it


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_resume_after_crash_is_bit_identical(tmp_path, arch):
    dic = planted_dictionary(16, 32)
    sae_cfg = SAEConfig(d_in=16, architecture=arch, expansion=8, k=3)
    # A short dead window makes AuxK (and its counters) part of what must survive the restart.
    tcfg = quick_cfg(batch_size=256, training_tokens=40 * 256, checkpoint_every=10, log_every=1,
                     dead_window_tokens=512)

    def data():  # ragged input batches: the re-batching position must be restored too
        return (x[: 100 + (i % 3) * 70] for i, x in enumerate(planted_batches(dic, 3, 300, seed=4)))

    reference = train(data(), sae_cfg, tcfg, checkpoint_dir=tmp_path / "reference")

    class Crash(Exception):
        pass

    def crash_at_25(info):
        if info["step"] == 25:
            raise Crash

    with pytest.raises(Crash):
        train(data(), sae_cfg, tcfg, checkpoint_dir=tmp_path / "run", progress=crash_at_25)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 20
    steps_seen: list[int] = []
    resumed = train(data(), sae_cfg, tcfg, checkpoint_dir=tmp_path / "run",
                    progress=lambda i: steps_seen.append(i["step"]))
    assert steps_seen[0] == 21 and steps_seen[-1] == 40
    ref_state, new_state = reference.sae.state_dict(), resumed.sae.state_dict()
    assert ref_state.keys() == new_state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], new_state[name]), name
    assert resumed.metrics == reference.metrics
    # The final checkpoints (Adam moments, dead-latent counters, ...) agree too, not only the weights.
    final_ref = load_file(str(tmp_path / "reference" / "ckpt-000000040" / "state.safetensors"))
    final_new = load_file(str(tmp_path / "run" / "ckpt-000000040" / "state.safetensors"))
    assert final_ref.keys() == final_new.keys()
    assert all(torch.equal(final_ref[k], final_new[k]) for k in final_ref)
    if arch == "batchtopk":  # AuxK was active, so the restored dead-latent counters mattered
        assert reference.metrics["aux_train"] > 0


def test_resume_refuses_a_different_config(tmp_path):
    dic = planted_dictionary(8, 16)
    tcfg = quick_cfg(batch_size=64, training_tokens=4 * 64, checkpoint_every=2)
    train(planted_batches(dic, 2, 64, 0), SAEConfig(d_in=8, expansion=2, k=2), tcfg, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different SAE/training config"):
        train(planted_batches(dic, 2, 64, 0), SAEConfig(d_in=8, expansion=2, k=3), tcfg, checkpoint_dir=tmp_path)


def test_resume_refuses_a_checkpoint_from_older_defaults(tmp_path):
    """A checkpoint without the resolved hyperparameters predates the retuned defaults: refused, not resumed
    silently under a different learning rate, AuxK weight or dead window."""
    dic = planted_dictionary(8, 16)
    tcfg = quick_cfg(batch_size=64, training_tokens=4 * 64, checkpoint_every=2)
    cfg = SAEConfig(d_in=8, expansion=2, k=2)
    train(planted_batches(dic, 2, 64, 0), cfg, tcfg, checkpoint_dir=tmp_path)
    name = json.loads((tmp_path / "latest.json").read_text())["checkpoint"]
    meta_path = tmp_path / name / "state.json"
    meta = json.loads(meta_path.read_text())
    assert meta["resolved"]["lr"] == tcfg.resolved_lr(cfg.d_sae)
    del meta["resolved"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="earlier actstore"):
        train(planted_batches(dic, 2, 64, 0), cfg, tcfg, checkpoint_dir=tmp_path)


def test_checkpoints_hold_no_pickle(tmp_path):
    dic = planted_dictionary(8, 16)
    tcfg = quick_cfg(batch_size=64, training_tokens=4 * 64, checkpoint_every=2)
    train(planted_batches(dic, 2, 64, 0), SAEConfig(d_in=8, expansion=2, k=2), tcfg, checkpoint_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["latest.json", "state.json", "state.safetensors"]
    tensors = load_file(str(next(tmp_path.rglob("state.safetensors"))))
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in tensors)


# -------------------------------------------------------------------------------------------- export
EXPORT_CASES = [
    SAEConfig(d_in=12, architecture="topk", expansion=3, k=5),
    SAEConfig(d_in=12, architecture="batchtopk", expansion=3, k=5),
    SAEConfig(d_in=12, architecture="matryoshka_batchtopk", expansion=3, k=5, matryoshka_widths=[4, 12]),
    SAEConfig(d_in=12, architecture="relu", expansion=3),
    SAEConfig(d_in=12, architecture="jumprelu", expansion=3),
    SAEConfig(d_in=12, architecture="relu", expansion=3, transcoder=True, skip=True, d_out=7),
]
EXPORT_IDS = ["topk", "batchtopk", "matryoshka", "relu", "jumprelu", "skip-transcoder"]


@pytest.mark.parametrize("cfg", EXPORT_CASES, ids=EXPORT_IDS)
def test_saelens_export_round_trip_is_exact(tmp_path, cfg):
    sae = _randomised(cfg, seed=4)
    meta = {"model_name": "tiny-gpt2", "context_size": 128, "dataset_path": "file:///store", "note": "x"}
    save_saelens(sae, tmp_path, "blocks.3.hook_resid_post", d_in=12, extra_metadata=meta)
    loaded = load_saelens(tmp_path)
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(16, 12)
    assert torch.equal(loaded(x)[0], sae(x)[0])

    cfg_json = json.loads((tmp_path / "cfg.json").read_text())
    expected_arch = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu", "relu": "standard",
                     "jumprelu": "jumprelu"}
    assert cfg_json["architecture"] == ("skip_transcoder" if cfg.transcoder else expected_arch[cfg.architecture])
    assert cfg_json["d_in"] == 12 and cfg_json["d_sae"] == 36
    assert cfg_json["dtype"] == "float32" and cfg_json["device"] == "cpu"
    assert cfg_json["hook_name"] == "blocks.3.hook_resid_post" and cfg_json["hook_layer"] == 3
    assert cfg_json["hook_head_index"] is None
    assert cfg_json["apply_b_dec_to_input"] is (not cfg.transcoder)
    assert cfg_json["normalize_activations"] == "none"
    assert (cfg_json["model_name"], cfg_json["context_size"]) == ("tiny-gpt2", 128)
    assert cfg_json["dataset_path"] == "file:///store"
    assert cfg_json["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    if cfg.architecture == "topk":
        assert cfg_json["k"] == 5 and cfg_json["activation_fn_kwargs"] == {"k": 5}
    weights = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (12, 36) and weights["W_dec"].shape == (36, cfg.d_target)
    assert ("threshold" in weights) == (cfg.architecture in ("jumprelu", "batchtopk", "matryoshka_batchtopk"))
    assert json.loads((tmp_path / "actstore.json").read_text())["metadata"]["note"] == "x"


def test_saelens_reads_a_matryoshka_export(tmp_path):
    """SAELens saves trained Matryoshka BatchTopK SAEs as JumpReLU; its own loader reads ours and encodes the
    same latents (SAELens is the dev extra's peer library)."""
    sae_lens = pytest.importorskip("sae_lens")
    ours = _randomised(SAEConfig(d_in=12, architecture="matryoshka_batchtopk", expansion=3, k=5,
                                 matryoshka_widths=[4, 12]), seed=4)
    save_saelens(ours, tmp_path, "blocks.1.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert int((f_ours != 0).sum()) > 0
        torch.testing.assert_close(f_theirs, f_ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(f_theirs), ours.decode(f_ours), rtol=1e-5, atol=1e-5)


def _saelens_reference(weights: dict, x: torch.Tensor, apply_b_dec: bool, threshold: bool) -> torch.Tensor:
    """SAELens' standard / jumprelu forward pass, written out independently of our module."""
    sae_in = x - weights["b_dec"] if apply_b_dec else x
    pre = sae_in @ weights["W_enc"] + weights["b_enc"]
    acts = torch.relu(pre) * (pre > weights["threshold"]) if threshold else torch.relu(pre)
    return acts @ weights["W_dec"] + weights["b_dec"]


@pytest.mark.parametrize("arch, apply_b_dec", [("standard", True), ("jumprelu", False)])
def test_loads_a_plain_saelens_directory(tmp_path, arch, apply_b_dec):
    gen = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(6, 18, generator=gen), "W_dec": torch.randn(18, 6, generator=gen),
               "b_enc": torch.randn(18, generator=gen), "b_dec": torch.randn(6, generator=gen)}
    if arch == "jumprelu":
        weights["threshold"] = torch.rand(18, generator=gen)
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": 6, "d_sae": 18, "dtype": "float32", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "hook_name": "blocks.0.hook_resid_post"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_saelens(tmp_path)
    x = torch.randn(40, 6, generator=gen)
    torch.testing.assert_close(sae(x)[0], _saelens_reference(weights, x, apply_b_dec, arch == "jumprelu"),
                               rtol=1e-5, atol=1e-4)


def test_train_result_save_loads_back(tmp_path):
    dic = planted_dictionary(8, 16)
    result = train(planted_batches(dic, 2, 64, 0), SAEConfig(d_in=8, expansion=2, k=2),
                   quick_cfg(batch_size=64, training_tokens=8 * 64))
    result.save(tmp_path, hook_name="blocks.0.hook_mlp_out", extra_metadata={"model_name": "m"})
    loaded = load_saelens(tmp_path)
    x = next(planted_batches(dic, 2, 32, 5))
    assert torch.equal(loaded(x)[0], result.sae(x)[0])
    meta = json.loads((tmp_path / "actstore.json").read_text())["metadata"]
    assert meta["train_metrics"]["steps"] == 8 and math.isfinite(meta["train_metrics"]["loss_train"])
