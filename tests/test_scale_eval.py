"""course_lib.scale.evaluate and course_lib.scale.cost on the CPU: the digits (mini-SD) path, the COCO path saying
what it needs offline, the SD 1.5 UNet config, and the cost measurement at a tiny size."""
from __future__ import annotations

import json

import pytest
import torch

from course_lib.scale import cost, evaluate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def test_digits_evaluation_reports_adherence_and_heldout_kid_over_seeds(tiny_sd_folder, tmp_path):
    res = evaluate.main(["--pipeline", str(tiny_sd_folder), "--out", str(tmp_path), "--digits", "--n-digits", "20",
                         "--seeds", "0", "1", "--steps", "2", "--batch", "20", "--repeats", "1", "--device", "cpu"])
    d = res["digits"]
    assert d["seeds"] == [0, 1] and len(d["runs"]) == 2
    assert 0.0 <= d["mean"]["adherence"] <= 1.0 and d["std"]["kid_heldout"] >= 0.0
    assert res["latency_s_batch1"] > 0 and res["throughput_img_s_batch20"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["digits"]["mean"] == d["mean"] and (tmp_path / "grid.png").is_file()
    assert "| digits adherence |" in (tmp_path / "results.md").read_text()


def test_coco_protocol_draws_one_caption_per_image_and_says_what_is_missing(tiny_sd_folder, tmp_path, monkeypatch):
    anns = [{"id": 10 + k, "image_id": k // 2, "caption": f"caption {k}"} for k in range(6)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"}
                                                                   for i in range(3)], "annotations": anns}))
    records = evaluate.coco_captions(tmp_path / "captions.json", "2017-5k", seed=0)
    assert [r["image_id"] for r in records] == [0, 1, 2]
    assert all(r["caption"] in (f"caption {2 * r['image_id']}", f"caption {2 * r['image_id'] + 1}") for r in records)
    assert records == evaluate.coco_captions(tmp_path / "captions.json", "2017-5k", seed=0)       # reproducible
    monkeypatch.setattr(evaluate, "INCEPTION", tmp_path / "no-inception.pt")
    res = evaluate.main(["--pipeline", str(tiny_sd_folder), "--out", str(tmp_path / "eval"), "--coco-captions",
                         str(tmp_path / "captions.json"), "--coco-images", str(tmp_path), "--no-speed",
                         "--device", "cpu"])
    assert res["n_samples"] == 3 and len(list((tmp_path / "eval" / "samples").glob("*.png"))) == 3
    notes = " ".join(res["notes"])
    assert "Inception weights are needed" in notes and "--clip" in notes
    res = evaluate.main(["--pipeline", str(tiny_sd_folder), "--out", str(tmp_path / "e2"), "--no-speed",
                         "--device", "cpu"])
    assert "--coco-captions" in res["notes"][0]


def test_sd15_unet_config_is_sd15s_and_the_budget_arithmetic(tmp_path):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cost.unet_config())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964          # SD 1.5's UNet
    b = cost.budget(1.0)                                                     # one second per sample
    assert b["samples"] == 70_000 * 64 + (25_000 + 21_500 + 18_000) * 1024
    assert b["wall_hours"]["8"] == pytest.approx(b["samples"] / 3600 / 8)
    assert b["paper_a100_hours"] == pytest.approx(199.2 * 24)


def test_cost_measures_a_training_step_at_a_tiny_size_on_the_cpu(tmp_path, capsys):
    res = cost.main(["--tiny", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                     "--out", str(tmp_path / "cost.json")])
    assert res["seconds_per_step"] > 0 and res["peak_memory_gib"] is None and res["params"] > 0
    assert "A GPU is needed for the real table" in capsys.readouterr().out
    assert json.loads((tmp_path / "cost.json").read_text())["batch_size_per_gpu"] == 2
    with pytest.raises(SystemExit, match="needs one"):
        if not torch.cuda.is_available():
            cost.main(["--device", "cpu"])
        else:
            raise SystemExit("needs one")


def test_cost_measures_a_dmd2_iteration_of_three_unets_at_a_tiny_size(tmp_path, capsys):
    res = cost.main(["--method", "dmd2", "--tiny", "--batch-size", "2", "--device", "cpu", "--lora", "4",
                     "--out", str(tmp_path / "dmd2.json")])
    assert res["method"] == "dmd2" and res["seconds_per_iteration"] > 0 and res["peak_memory_gib"] is None
    # a LoRA generator trains only its adapter; the critic trains the whole fake score and the GAN head
    assert 0 < res["trainable_generator"] < res["params_unet"] < res["trainable_critic"]
    b = cost.dmd2_budget(1.0, 4)                                             # one second per iteration, batch 4
    assert b["gpu_hours"] == pytest.approx(41_000 * 2048 / 4 / 3600)
    assert b["paper_gpu_hours"] == 64 * 25.0
    assert "A GPU is needed for the real table" in capsys.readouterr().out
    assert json.loads((tmp_path / "dmd2.json").read_text())["lora_rank"] == 4


def test_cost_table_measures_each_row_keeps_them_and_records_out_of_memory(tmp_path, monkeypatch, capsys):
    rows = (("reflow", 2, True, 0, 0), ("dmd2", 2, False, 4, 0), ("lcm-lora", 2, True, 4, 0))
    res = cost.table(tiny=True, device="cpu", rows=rows, out=tmp_path / "table.json", progress=False)
    assert [r["method"] for r in res] == ["reflow", "dmd2", "lcm-lora"] and all(r["status"] == "ok" for r in res)
    assert res[1]["grad_checkpointing"] is False and res[1]["lora_rank"] == 4 and res[1]["seconds_per_iteration"] > 0
    assert res[0]["seconds_per_sample"] == pytest.approx(res[0]["seconds_per_step"] / 2)
    assert [r["method"] for r in json.loads((tmp_path / "table.json").read_text())["rows"]] == ["reflow", "dmd2",
                                                                                                  "lcm-lora"]
    cost.print_table(res)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(lines) == 4 and lines[2].startswith("| dmd2 | 2 | off | 4 |")        # the header and three rows

    measure = cost.measure

    def oom_at_64(batch_size, *args, **kwargs):
        if batch_size == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return measure(batch_size, *args, **kwargs)

    monkeypatch.setattr(cost, "measure", oom_at_64)                # a row that does not fit is recorded, not fatal
    res = cost.table(tiny=True, device="cpu", rows=(("reflow", 64, False, 0, 0), ("reflow", 2, True, 0, 0)),
                     progress=False)
    assert res[0]["status"] == "out of memory" and "20.00 GiB" in res[0]["error"] and res[1]["status"] == "ok"
    with pytest.raises(ValueError, match="unknown method"):
        cost.table(tiny=True, device="cpu", rows=(("sdxl", 2, True, 0, 0),), progress=False)
