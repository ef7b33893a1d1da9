"""Devices, mixed precision, feature placement and the compiled step: what runs where never changes what is saved.

CPU tests run everywhere; tests marked `cuda` need a CUDA GPU and are skipped, with the reason, without one.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import CLASSES, bad
from taft import Classifier, TaftError
from taft.model import load_checkpoint
from taft.cli import main
from taft.devices import pin_process, resolve_device, shard_devices, worker_device
from taft.parallel.executors import default_workers
from taft.precision import autocast, check_autocast
from taft.tensors import device_free
from taft.data.feature_cache.key import CACHE_DTYPE, dtype_name
from taft.data.trunk_features import cache_features
from taft.train import Compute, TrainConfig, evaluate, fit, plan_run
from taft.privacy.dpsgd import manual_attention
from taft.tails import key_bias_rows
from taft.train.compiled import CompiledStep
from taft.train.feeding import DEVICE_FRACTION, choose_feed, streamed
from taft.train.examples import Examples, Prepared
from taft.train.loop import train_loop
from helpers import make_classes
from test_cli import FAST
from test_text_train import dataset as text_dataset
from test_train import synthetic_images

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the error for an absent GPU; this machine has CUDA")


@pytest.fixture(scope="module")
def cached(tiny_vit, tmp_path_factory):
    """Cached trunk features (a memmap entry) of 24 synthetic images for k=2."""
    return cache_features(synthetic_images(), tiny_vit, 2, root=tmp_path_factory.mktemp("cache"), progress=False)


def config(**kw) -> TrainConfig:
    return TrainConfig(lr=1e-2, epochs=kw.pop("epochs", 2), batch_size=8, **kw)


def model(backbone, method: str = "taft") -> Classifier:
    """A fresh k=2 model (what `cached` holds the trunk features of)."""
    return Classifier(backbone, CLASSES, 2, method=method)


def trained_tensors(result) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in result.classifier.trainable_state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------------------------ device names
def test_device_names_resolve_or_name_the_problem():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(None) == resolve_device(" CPU ")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu"))
    for name in ("tpu", "cuda:x", "cuda:-1", "gpu", ""):
        with pytest.raises(TaftError, match="unknown device"):
            resolve_device(name)
    with pytest.raises(TaftError, match="a device is a name"):
        resolve_device(3)  # type: ignore[arg-type]
    assert shard_devices("cpu") == [torch.device("cpu")]


@no_cuda
def test_absent_gpu_is_a_one_line_error():
    with pytest.raises(TaftError, match='device cuda is not available: .*use device="cpu"'):
        resolve_device("cuda")
    with pytest.raises(TaftError, match="device cuda:1 is not available"):
        resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(TaftError, match="device mps is not available"):
            resolve_device("mps")


@no_cuda
def test_unavailable_device_on_the_command_line_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    data = make_classes(tmp_path / "data")
    cache = tmp_path / "cache"
    monkeypatch.setenv("TAFT_CACHE", str(cache))
    out = tmp_path / "run"
    bad(capsys, ["train", "--data", str(data), "--out", str(out), "--device", "cuda", *FAST], "device cuda is not")
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(data), "--store", str(tmp_path / "store"), "--device", "cuda:0",
                 "--image-size", "28", "--quiet"], "device cuda:0 is not")
    bad(capsys, ["train", "--data", str(data), "--out", str(out), "--device", "tpu", *FAST], "unknown device 'tpu'")
    bad(capsys, ["train", "--data", str(data), "--out", str(out), "--autocast", "fp16", "--device", "cpu", *FAST],
        "fp16 autocast is not supported on the CPU")
    bad(capsys, ["train", "--data", str(data), "--out", str(out), "--autocast-training", *FAST],
        "--autocast-training needs --autocast")
    assert not out.exists() and not (tmp_path / "store").exists()
    assert not cache.exists() or not any(cache.rglob("*.npy"))  # no features were computed either


def test_cli_train_eval_predict_on_the_cpu(tmp_path, capsys):
    data = make_classes(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--val-fraction", "0.34", "--device", "cpu",
                 "--threads", "1", *FAST]) == 0
    assert "examples/s on cpu" in capsys.readouterr().out
    compute = json.loads((out / "metrics.json").read_text())["compute"]
    assert compute == {"device": "cpu", "autocast": "none", "compiled": False,
                       "feed": {"train": "host", "val": "host"}, "threads": 1}
    ckpt = str(out / "checkpoint.safetensors")
    assert main(["eval", ckpt, "--data", str(data), "--device", "cpu", "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["predict", ckpt, str(data / "ant" / "0.png"), "--device", "cpu", "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("\t") == 1
    bad(capsys, ["predict", ckpt, str(data / "ant" / "0.png"), "--threads", "0"], "threads must be an integer ≥ 1")


# ------------------------------------------------------------------------------------ device-free checkpoints
def test_saved_tensors_are_contiguous_cpu_copies_and_meta_or_half_tensors_are_refused():
    base = torch.arange(12.0).reshape(3, 4)
    out = device_free({"t": base.t()})  # a non-contiguous view
    assert out["t"].is_contiguous() and out["t"].device.type == "cpu" and torch.equal(out["t"], base.t())
    out["t"].zero_()
    assert base.sum() == 66  # a copy, not the caller's storage
    with pytest.raises(TaftError, match="meta device"):
        device_free({"a": torch.zeros(2), "b": torch.zeros(2, device="meta")})
    with pytest.raises(TaftError, match="bfloat16; checkpoints hold float32"):
        device_free({"a": torch.zeros(2, dtype=torch.bfloat16)})


def test_checkpoint_round_trip_through_meta_and_back(tiny_vit, cached, tmp_path):
    result = fit(model(tiny_vit), cached, config(), progress=False)
    path = result.classifier.save(tmp_path / "c.safetensors", train_ids=cached.ids)
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in stored.values())
    on_meta, _ = load_checkpoint(path, tiny_vit, device="meta")  # loads anywhere, even without data
    assert on_meta.device.type == "meta"
    before = path.read_bytes()
    with pytest.raises(TaftError, match="meta device"):
        on_meta.save(path, train_ids=cached.ids)
    assert path.read_bytes() == before  # the refused save left the file alone
    back, _ = load_checkpoint(path, tiny_vit, device="cpu")
    assert_same_tensors(trained_tensors(result), trained_tensors(type("R", (), {"classifier": back})))
    with pytest.raises(TaftError, match="float16; checkpoints hold float32"):
        back.to(torch.float16).save(tmp_path / "half.safetensors", train_ids=cached.ids)
    assert not (tmp_path / "half.safetensors").exists()


# ----------------------------------------------------------------------------------------------- mixed precision
def test_autocast_names_and_devices():
    assert check_autocast("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(TaftError, match="autocast must be one of none, bf16, fp16"):
        check_autocast("fp8")
    with pytest.raises(TaftError, match="fp16 autocast is not supported on the CPU"):
        check_autocast("fp16", torch.device("cpu"))
    with autocast("bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autocast_feature_build_keeps_the_stored_dtype_and_has_its_own_cache_entry(tiny_vit, tmp_path, dtype):
    ds = synthetic_images(2)
    plain = cache_features(ds, tiny_vit, 2, root=tmp_path, dtype=dtype, progress=False)
    bf16 = cache_features(ds, tiny_vit, 2, root=tmp_path, dtype=dtype, autocast="bf16", progress=False)
    assert plain.path != bf16.path and bf16.meta["key"]["key"]["autocast"] == "bf16"
    assert "autocast" not in plain.meta["key"]["key"]  # entries made before autocast existed stay valid
    assert np.load(bf16.path / "features.npy", mmap_mode="r").dtype == np.dtype(str(dtype).removeprefix("torch."))
    a, b = plain.as_tensors()[0], bf16.as_tensors()[0]
    assert not torch.equal(a, b)  # computed in bfloat16: other features
    torch.testing.assert_close(b, a, rtol=0.1, atol=0.1)  # bf16 keeps ~3 significant digits through 1 block


def test_autocast_training_keeps_float32_weights_and_optimizer_state(tiny_vit, cached, tmp_path):
    eager = fit(model(tiny_vit), cached, config(), progress=False)
    mixed = fit(model(tiny_vit), cached, config(), progress=False, compute=Compute(autocast="bf16"),
                run_dir=tmp_path / "run")
    assert mixed.metrics["compute"]["autocast"] == "bf16"
    trained = trained_tensors(mixed)
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert any(not torch.equal(trained[n], t) for n, t in trained_tensors(eager).items())  # autocast did apply
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    # the optimizer state of a bf16-autocast loop is float32 too
    clf = model(tiny_vit)
    prepared = Prepared(clf, Examples(cached))
    captured = {}
    real = torch.optim.AdamW

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["opt"] = self

    torch.optim.AdamW = Spy
    try:
        train_loop(clf, plan_run(clf, config(epochs=1), len(cached)), prepared, progress=False, autocast="bf16")
    finally:
        torch.optim.AdamW = real
    states = [v for s in captured["opt"].state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert states and {t.dtype for t in states if t.numel() > 1} == {torch.float32}


def test_dp_refuses_autocast_and_compile(tiny_vit, cached):
    from taft.privacy import DPConfig

    dp = DPConfig(delta=1e-3, noise_multiplier=1.0)
    with pytest.raises(TaftError, match="autocast and compile are not supported with dp"):
        fit(model(tiny_vit), cached, config(), progress=False, dp=dp, compute=Compute(autocast="bf16"))
    with pytest.raises(TaftError, match="autocast and compile are not supported with dp"):
        fit(model(tiny_vit), cached, config(), progress=False, dp=dp, compute=Compute(compile=True))


# ----------------------------------------------------------------------------------------- feature placement
def test_feed_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_feed("auto", cpu, 10**12) == "host"
    assert choose_feed("stream", cpu, 1) == "stream"
    with pytest.raises(TaftError, match="feed must be one of"):
        choose_feed("disk", cpu, 1)
    import taft.train.feeding as feeding

    free = 1000
    real = feeding.free_memory
    feeding.free_memory = lambda device: free
    try:
        assert choose_feed("auto", gpu, int(DEVICE_FRACTION * free)) == "resident"
        assert choose_feed("auto", gpu, int(DEVICE_FRACTION * free) + 1) == "stream"
    finally:
        feeding.free_memory = real


@pytest.mark.parametrize("method", ["taft", "nlft", "probe"])
def test_resident_and_streamed_features_train_exactly_like_the_memmap(tiny_vit, cached, method):
    results = {feed: fit(model(tiny_vit, method), cached, config(), val=cached, progress=False,
                         compute=Compute(feed=feed))
               for feed in ("host", "resident", "stream")}
    assert results["stream"].metrics["compute"]["feed"]["train"] == ("resident" if method == "probe" else "stream")
    for feed in ("resident", "stream"):
        assert_same_tensors(trained_tensors(results["host"]), trained_tensors(results[feed]))
        assert results[feed].metrics["top1"] == results["host"].metrics["top1"]
        assert results[feed].history[-1]["val_loss"] == results["host"].history[-1]["val_loss"]


def test_streamed_text_features_equal_the_memmap(tiny_bert):
    cf = cache_features(text_dataset(tiny_bert), tiny_bert, 1, progress=False, dtype=torch.float16)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=5)

    def text_model() -> Classifier:
        return Classifier(tiny_bert, cf.class_names, 1, method="taft", pooling="mean")

    host = fit(text_model(), cf, cfg, progress=False, compute=Compute(feed="host"))
    for feed in ("resident", "stream"):
        other = fit(text_model(), cf, cfg, progress=False, compute=Compute(feed=feed))
        assert_same_tensors(trained_tensors(host), trained_tensors(other))
    assert evaluate(host.classifier, cf, feed="stream").loss == evaluate(host.classifier, cf, feed="host").loss


def test_streaming_stops_early_and_passes_errors_on():
    order = [torch.tensor([i]) for i in range(50)]
    read = lambda idx: (idx.float(), idx, None)  # noqa: E731  (x, y, mask)
    batches = streamed(read, order, torch.device("cpu"), torch.float64)
    first = next(batches)
    assert first[0].dtype == torch.float64 and first[1].tolist() == [0] and first[2] is None
    batches.close()  # the consumer stops: the reading thread ends (close joins it)

    def failing(idx):
        if int(idx) == 3:
            raise ValueError("row 3 unreadable")
        return read(idx)

    with pytest.raises(ValueError, match="row 3 unreadable"):
        list(streamed(failing, order, torch.device("cpu"), torch.float32))


# --------------------------------------------------------------------------------------------- compiled step
def test_compile_falls_back_to_eager_with_one_warning(tiny_vit, cached):
    clf = model(tiny_vit)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    step = CompiledStep(clf.train_logits, enabled=True, backend=broken_backend)
    x = torch.from_numpy(np.array(cached.features[:4], dtype=np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = step(x), step(x)
    assert len(caught) == 1 and "running eagerly" in str(caught[0].message) and "no compiler here" in str(
        caught[0].message)
    assert not step.active and torch.equal(first, clf.train_logits(x)) and torch.equal(second, first)
    assert not CompiledStep(clf.train_logits).active  # eager is the default


@pytest.mark.slow
def test_compiled_training_equals_eager(tiny_vit, cached):
    """torch.compile's graph capture and autograd (backend aot_eager: the inductor backend needs about a minute
    per graph on 2 CPU cores) train the same weights as eager, to float32 rounding."""
    cfg = config(epochs=1)
    weights = {}
    for name, enabled in (("eager", False), ("compiled", True)):
        clf = model(tiny_vit)
        step = CompiledStep(clf.train_logits, enabled=enabled, backend="aot_eager")
        train_loop(clf, plan_run(clf, cfg, len(cached)), Prepared(clf, Examples(cached)), progress=False,
                   forward=step)
        assert step.active == enabled
        weights[name] = {n: t.detach().clone() for n, t in clf.trainable_state_dict().items()}
    for n, w in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][n], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_trained_weights_do_not_depend_on_the_attention_kernel(tiny_vit, cached, method):
    """Fused SDPA and a written-out softmax round differently, as a GPU, a compiler or another thread count do.
    The key bias's gradient is only that rounding (softmax ignores b_k), which Adam would turn into steps of about
    lr; training leaves b_k where it started, so the weights agree to float32 rounding, not just the function."""
    weights, key_bias = {}, {}
    for impl in ("sdpa", "manual"):
        clf = model(tiny_vit, method)
        start = {n: t.detach().clone() for n, t in clf.trainable_state_dict().items()}
        with manual_attention(clf.tail) if impl == "manual" else contextlib.nullcontext():
            weights[impl] = trained_tensors(fit(clf, cached, config(), progress=False))
        rows = key_bias_rows(clf.tail)
        assert len(rows) == 2  # k = 2 blocks
        key_bias[impl] = all(torch.equal(weights[impl][n][r], start[n][r]) for n, r in rows.items())
    assert key_bias == {"sdpa": True, "manual": True}
    for n, w in weights["sdpa"].items():
        torch.testing.assert_close(weights["manual"][n], w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- shard workers
def test_process_workers_are_pinned_to_their_devices_in_turn():
    from taft.devices import pinned_device
    from taft.parallel.executors import make_executor

    with make_executor("process", workers=2, devices=["cpu", "meta"]) as ex:
        seen = {str(f.result()) for f in [ex.submit(pinned_device) for _ in range(8)]}
    assert seen <= {"cpu", "meta"} and seen  # each worker took one device from the queue; none is unpinned
    assert pinned_device() is None or pinned_device() == torch.device("cpu")  # this process: not a pool worker


def test_shard_workers_one_per_gpu_and_pinning():
    assert default_workers(8, [torch.device("cuda", 0), torch.device("cuda", 1)]) == 2
    assert default_workers(1, ["cuda:0", "cuda:1"]) == 1
    assert default_workers(3, [torch.device("cpu")]) == min(3, default_workers(3))
    pin_process("cpu")  # a CPU-pinned process resolves other names as usual
    assert worker_device("cpu") == torch.device("cpu")
    if not HAS_CUDA:
        with pytest.raises(TaftError, match="not available"):
            worker_device("cuda")


# ------------------------------------------------------------------------------------------------------- CUDA
@cuda
def test_cuda_training_saves_cpu_tensors_that_load_on_the_cpu(tiny_vit, cached, tmp_path):
    result = fit(model(tiny_vit), cached, config(), val=cached, progress=False, compute=Compute(device="cuda"),
                 run_dir=tmp_path / "run")
    assert result.classifier.device.type == "cuda" and result.metrics["compute"]["device"] == "cuda:0"
    on_cpu, _ = load_checkpoint(result.checkpoint, tiny_vit, device="cpu")
    assert_same_tensors(trained_tensors(result), trained_tensors(type("R", (), {"classifier": on_cpu})))
    x = torch.from_numpy(np.array(cached.features[:8], dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(on_cpu.logits(x), result.classifier.logits(x).cpu(), rtol=1e-4, atol=1e-4)
    cpu_run = fit(model(tiny_vit), cached, config(), progress=False, compute=Compute(device="cpu"))
    for n, t in trained_tensors(cpu_run).items():  # same training on another device: float rounding only
        torch.testing.assert_close(trained_tensors(result)[n], t, rtol=1e-3, atol=1e-4)


@cuda
def test_cuda_resident_and_streamed_features_train_identically(tiny_vit, cached):
    """Bit for bit where CUDA training repeats itself, which a second host-fed run tells (the memory-efficient
    attention backward may sum over key splits in no fixed order); otherwise to float32 rounding."""
    def run(feed: str) -> dict[str, torch.Tensor]:
        result = fit(model(tiny_vit), cached, config(), progress=False, compute=Compute(device="cuda", feed=feed))
        assert result.metrics["compute"]["feed"]["train"] == feed
        return trained_tensors(result)

    host = run("host")
    repeats = all(torch.equal(t, host[n]) for n, t in run("host").items())
    for feed in ("resident", "stream"):
        other = run(feed)
        if repeats:
            assert_same_tensors(host, other)
        else:
            for n, t in other.items():
                torch.testing.assert_close(t, host[n], rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cuda_autocast_keeps_the_cache_dtype_and_float32_weights(tiny_vit, tmp_path, name):
    cf = cache_features(synthetic_images(), tiny_vit, 2, root=tmp_path, device="cuda", autocast=name, progress=False)
    assert np.load(cf.path / "features.npy", mmap_mode="r").dtype == np.dtype(dtype_name(CACHE_DTYPE))  # not name's
    result = fit(model(tiny_vit), cf, config(), progress=False, compute=Compute(device="cuda", autocast=name))
    assert {t.dtype for t in result.classifier.trainable_state_dict().values()} == {torch.float32}


@cuda
def test_cuda_compiled_training_equals_eager(tiny_vit, cached):
    cfg = config(epochs=1)
    weights = {}
    for name, enabled in (("eager", False), ("compiled", True)):
        clf = model(tiny_vit).to("cuda")
        step = CompiledStep(clf.train_logits, enabled=enabled)
        prepared = Prepared(clf, Examples(cached))
        prepared.place(clf.device)
        train_loop(clf, plan_run(clf, cfg, len(cached)), prepared, progress=False, forward=step)
        assert step.active == enabled
        weights[name] = {n: t.detach().cpu() for n, t in clf.trainable_state_dict().items()}
    for n, w in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][n], w, rtol=1e-4, atol=1e-5)


@cuda
def test_cuda_cli_train_and_shards(tmp_path, capsys):
    data = make_classes(tmp_path / "data")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cuda", *FAST]) == 0
    assert "on cuda:0" in capsys.readouterr().out
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--store", str(tmp_path / "store"), "--shards", "2",
                 "--device", "cuda", "--image-size", "28", "--epochs", "1", "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "store" / "composed.safetensors"), "--data", str(data), "--device", "cpu",
                 "--quiet"]) == 0
