"""sample_latency, throughput and peak_memory: the whole generation (text, denoise, decode) of
tiny models, each part timed, on pixel, latent and text-conditioned backbones."""
from __future__ import annotations

import pytest
import torch

import harness
from harness import sampling
from harness.context import CellContext
from harness.errors import MetricUnavailable
from harness.suite import CellConfig
from test_data import tiny_vae  # noqa: F401  (fixtures: a saved tiny VAE and tiny SD/SDXL pipelines)
from test_pickscore import tiny_pipeline, tiny_sdxl_pipeline  # noqa: F401

DIT = {"name": "dit", "size": "tiny", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch": 2}


def cell(backbone, data=None, **extra) -> CellContext:
    config = {"backbone": backbone, "metrics": ["params"], "device": "cpu", **extra}
    if data:
        config["data"] = data
    return CellContext("t", "c", 0, CellConfig.model_validate(config))


def count_calls(model) -> list:
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def assert_shares(out, parts):
    assert set(out["seconds"]) == set(out["share"]) == {"text", "denoise", "decode"}
    for k in ("text", "denoise", "decode"):
        if k in parts:
            assert out["seconds"][k] > 0 and 0 < out["share"][k] <= 1, k
        else:
            assert out["seconds"][k] is None and out["share"][k] is None, k
    assert sum(v for v in out["share"].values() if v is not None) == pytest.approx(1.0)


def test_pixel_dit_times_its_denoising_steps_only():
    ctx = cell(DIT, {"name": "shapes", "resolution": 8, "size": 4})
    calls = count_calls(ctx.model)
    out = harness.create("metric", "sample_latency", steps=3, warmup=1, runs=2, batch_size=2, cfg_scale=1.5)(ctx)
    assert out["value"] > 0 and out["iqr"] >= 0 and out["per_image"] == pytest.approx(out["value"] / 2)
    assert_shares(out, {"denoise"})  # pixel space, class labels: no text encoder, no VAE
    # every run is 3 steps of two model calls (guidance) on the batch of 2
    assert calls == [2] * (3 * 2 * (1 + 2)) and out["model_calls"] == 6 and out["runs"] == 2
    assert out["image_size"] == [8, 8] and out["vae"] is None and out["text_encoder"] is None
    assert {"dtype", "device", "threads", "sampler", "steps", "kernels", "load_average"} <= set(out)
    assert ctx.model.training  # left as it was found


def test_another_dtype_runs_a_cast_copy_and_leaves_the_cell_model_alone():
    ctx = cell(DIT, {"name": "shapes", "resolution": 8, "size": 4})
    seen = []  # (the copy inherits the hook)
    ctx.model.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    out = harness.create("metric", "sample_latency", steps=2, warmup=0, runs=1, dtype="bfloat16")(ctx)
    assert out["dtype"] == "bfloat16" and out["value"] > 0 and seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert next(ctx.model.parameters()).dtype == torch.float32 and ctx.model.training


def test_latent_backbone_decodes_with_its_data_blocks_vae(tiny_vae, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    ctx = cell(DIT, {"name": "shapes", "resolution": 16, "size": 4, "vae": tiny_vae})
    assert ctx.input_spec["in_channels"] == 4 and ctx.input_spec["input_size"] == 8
    out = harness.create("metric", "sample_latency", steps=2, warmup=0, runs=2)(ctx)
    assert_shares(out, {"denoise", "decode"})
    assert out["image_size"] == [16, 16] and out["vae"] == "the data set's VAE" and out["resolution"] == 8
    # without a data block the vae option decodes; without either there is nothing to time
    ctx = cell(dict(DIT, input_size=8))
    assert harness.create("metric", "sample_latency", steps=1, warmup=0, runs=1, vae=tiny_vae)(ctx)["vae"] == tiny_vae
    with pytest.raises(MetricUnavailable, match="decode part: a latent backbone .* vae:"):
        harness.create("metric", "sample_latency", steps=1)(ctx)
    with pytest.raises(MetricUnavailable, match="cannot load the VAE .*nowhere"):
        harness.create("metric", "sample_latency", steps=1, vae=str(tmp_path / "nowhere"))(ctx)


def test_text_unet_encodes_denoises_and_decodes_through_its_pipeline(tiny_pipeline):  # noqa: F811
    from harness_t2i import encode_prompts

    ctx = cell({"name": "unet", "preset": "sd-tiny", "pretrained": tiny_pipeline})  # the pipeline's own U-Net
    seen = []
    ctx.model.register_forward_hook(lambda m, args, out: seen.append(args[2]))
    out = harness.create("metric", "sample_latency", steps=2, warmup=0, runs=1, batch_size=2, cfg_scale=7.5,
                         pipeline=tiny_pipeline, prompt="a red circle")(ctx)
    assert_shares(out, {"text", "denoise", "decode"})
    assert out["image_size"] == [32, 32] and out["text_encoder"] == tiny_pipeline and out["model_calls"] == 4
    # the U-Net was conditioned on the prompt's encoding, and guided by the empty prompt's
    (cond, null), _ = encode_prompts(tiny_pipeline, ["a red circle", ""])
    assert len(seen) == 2 * 2 and all(y.shape == (2, 77, 32) for y in seen)
    torch.testing.assert_close(seen[0], cond.expand(2, -1, -1))
    torch.testing.assert_close(seen[1], null.expand(2, -1, -1))
    with pytest.raises(MetricUnavailable, match="text part: .* no pipeline encodes prompts"):
        harness.create("metric", "sample_latency", steps=1)(ctx)


def test_sdxl_unet_takes_pooled_text_and_says_when_the_pipeline_has_no_vae(tiny_sdxl_pipeline,  # noqa: F811
                                                                          tiny_pipeline):  # noqa: F811
    ctx = cell({"name": "unet", "preset": "sdxl-tiny"})
    with pytest.raises(MetricUnavailable, match="decode part: cannot load the VAE .*vae"):
        harness.create("metric", "sample_latency", steps=1, pipeline=tiny_sdxl_pipeline)(ctx)
    # with a VAE from elsewhere the rest runs: both text encoders, the pooled embedding, the size ids
    seen = []
    ctx.model.register_forward_hook(lambda m, args, out: seen.append(args[2]))
    out = harness.create("metric", "sample_latency", steps=1, warmup=0, runs=1, batch_size=3,
                         pipeline=tiny_sdxl_pipeline, vae=f"{tiny_pipeline}/vae")(ctx)
    assert_shares(out, {"text", "denoise", "decode"})
    y = seen[0]
    assert y["y"].shape == (3, 77, 32) and y["text_embeds"].shape == (3, 32)
    assert y["time_ids"][0].tolist() == [128, 128, 0, 0, 128, 128]  # pixels: 8x the 16-wide latent


def test_throughput_at_a_given_batch_and_the_cpu_default():
    ctx = cell(DIT, {"name": "shapes", "resolution": 8, "size": 4})
    out = harness.create("metric", "throughput", steps=2, warmup=0, runs=2, batch_size=3)(ctx)
    assert out["value"] == pytest.approx(3 / out["latency"]) and out["batch_size"] == 3
    assert out["batch_size_from"] == "given" and out["search"] is None
    out = harness.create("metric", "throughput", steps=1, warmup=0, runs=1)(ctx)
    assert out["batch_size"] == 1 and "no largest-batch search off CUDA" in out["batch_size_from"]


def test_throughput_searches_the_largest_batch_until_out_of_memory():
    from harness_measure.sampling_costs import Throughput

    class Gen:  # a fake generation that runs out of CUDA memory at batch 8
        def run(self, model, batch):
            if batch >= 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return {"text": None, "denoise": 0.1 * batch, "decode": 0.05}

    batch, how, search = Throughput()._largest(Gen(), None)
    assert batch == 4 and "8 ran out of CUDA memory" in how
    assert search == pytest.approx({"1": 1 / 0.15, "2": 2 / 0.25, "4": 4 / 0.45})
    batch, how, _ = Throughput(max_batch_size=2)._largest(Gen(), None)
    assert batch == 2 and "max_batch_size 2" in how


def test_peak_memory_grows_with_the_batch_on_the_cpu():
    ctx = cell(dict(DIT, hidden_size=64), {"name": "shapes", "resolution": 32, "size": 4})
    small = harness.create("metric", "peak_memory", steps=1, batch_size=1)(ctx)
    large = harness.create("metric", "peak_memory", steps=1, batch_size=64)(ctx)
    assert small["value"] > 0 and small["bytes"] == pytest.approx(small["value"] * 2 ** 20)
    assert large["bytes"] > small["bytes"] and "resident set" in large["measure"]


def test_peak_memory_on_cuda_is_max_allocated_over_one_generation(monkeypatch):
    """The CUDA branch, with torch.cuda's counters faked (no GPU here): reset, run, read."""
    from harness_measure.sampling_costs import PeakMemory

    events = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 100 * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 356 * 2 ** 20)

    class Gen:
        device = torch.device("cuda")

        def sync(self):
            events.append("sync")

        def run(self, model, batch):
            events.append(("run", batch))

    out = PeakMemory(batch_size=2)._cuda(Gen(), None)
    assert events == ["sync", "reset", ("run", 2)]
    assert out["value"] == 356 and out["growth_bytes"] == 256 * 2 ** 20 and out["baseline_bytes"] == 100 * 2 ** 20


def test_records_hold_the_three_costs(tmp_path):
    from harness.runner import CellJob, execute_cell

    metrics = [{"name": "sample_latency", "steps": 1, "warmup": 0, "runs": 2},
               {"name": "throughput", "steps": 1, "warmup": 0, "runs": 1, "batch_size": 2},
               {"name": "peak_memory", "steps": 1}]
    config = {"backbone": DIT, "data": {"name": "shapes", "resolution": 8, "size": 4}, "metrics": metrics,
              "device": "cpu"}
    record = execute_cell(CellJob("t", "t.yaml", "c", "base", 0, config, str(tmp_path)))
    assert record["status"] == "ok", record.get("traceback")
    m = record["metrics"]
    assert {k: m[k]["role"] for k in ("sample_latency", "throughput", "peak_memory")} == dict.fromkeys(
        ("sample_latency", "throughput", "peak_memory"), "cost")
    assert "ran_alone" in m["sample_latency"] and "ran_alone" in m["throughput"]
    assert m["sample_latency"]["share"]["denoise"] == 1.0 and m["peak_memory"]["value"] > 0


@pytest.mark.parametrize("options, message", [({"steps": 0}, "steps >= 1"), ({"sampler": "pndm"}, "sampler"),
                                              ({"runs": 0}, "runs >= 1"), ({"dtype": "int8"}, "dtype")])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        harness.create("metric", "sample_latency", **options)


def test_sample_batch_takes_a_conditioning_and_its_null_twin():
    seen = []

    class Echo(torch.nn.Module):
        def forward(self, x, t, y=None):
            seen.append(y)
            return torch.zeros_like(x)

    cond, null = torch.ones(2, 5, 3), torch.zeros(2, 5, 3)
    _, labels = sampling.sample_batch(Echo(), [0, 1], shape=(4, 2, 2), steps=2, cond=cond, null_cond=null,
                                      cfg_scale=2.0)
    assert seen == [cond, null, cond, null] and torch.equal(labels, torch.zeros(2, dtype=torch.long))
