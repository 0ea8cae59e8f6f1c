"""course_lib.scale on the tiny offline Stable Diffusion: data sources and the embedding cache, triplets (one and
two processes, resumed), export (a plain diffusers pipeline takes the student's one Euler step; LoRA in diffusers
and kohya formats), and the clear errors on bad input (nothing overwritten)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from course_lib import sd
from course_lib.scale import data, export, triplets
from course_lib.scale.common import CacheMismatch, SourceError
from conftest import save_tiny_sd

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
HERE = Path(__file__).parent
PROMPTS = ["a handwritten seven", "a thick three", "a small zero"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny pipeline (and a second one with other weights), a prompt file, its embeddings, 10 triplets."""
    root = tmp_path_factory.mktemp("scale")
    save_tiny_sd(root / "tiny", seed=0)
    save_tiny_sd(root / "other", seed=1)
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n", encoding="utf-8")
    data.build_embeddings(root / "tiny", root / "prompts.txt", root / "emb", shard_size=2, device="cpu",
                          dtype="float32", progress=False)
    triplets.generate_triplets(root / "tiny", root / "emb", root / "tri", n=10, w=1.0, steps=3, shard_size=4,
                               batch_size=2, device="cpu", progress=False)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def _png(color) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_prompt_sources_read_text_jsonl_coco_and_webdataset(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a seven", "label": 7}\n\n{"caption": "a two"}\n', encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"annotations": [{"image_id": 3, "caption": " a cat "},
                                                                 {"image_id": 4, "caption": "a dog"}]}))
    _tar(tmp_path / "s.tar", {"000.txt": b"red square", "000.png": _png("red"), "001.txt": b"no image"})
    assert [e.prompt for e in data.read_source(tmp_path / "p.jsonl")] == ["a seven", "a two"]
    assert [(e.prompt, e.image_id) for e in data.read_source(tmp_path / "c.json")] == [("a cat", 3), ("a dog", 4)]
    assert [e.prompt for e in data.read_source(tmp_path / "s.tar")] == ["red square", "no image"]
    with_images = data.read_source(tmp_path / "s.tar", images=True)
    assert [e.prompt for e in with_images] == ["red square"]
    img = data.load_image(with_images[0].image, 16)
    assert img.shape == (3, 16, 16) and torch.allclose(img[0], torch.ones(16, 16)) and float(img[1].max()) == -1.0


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"\n  \n", "yielded nothing: expected one prompt per line"),
    ("binary.txt", b"\x89PNG\x00\x00\x01", "not a text file"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("wrong.json", b'{"images": []}', "not a COCO captions file"),
    ("empty.tar", None, "yielded nothing: expected webdataset"),
])
def test_a_source_that_yields_nothing_says_what_was_expected(tmp_path, name, content, match):
    path = tmp_path / name
    if content is None:
        _tar(path, {"000.png": _png("blue")})
    else:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=match):
        data.read_source(path)


def test_parquet_without_pyarrow_and_missing_course_list_are_clear(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match="pip install pyarrow"):
            data.read_source(tmp_path / "a.parquet")
    monkeypatch.setattr(data, "course_prompts", lambda: tmp_path / "prompts" / "digits.txt")
    with pytest.raises(SourceError, match="does not exist"):
        data.read_source("course")
    with pytest.raises(SourceError, match="real images come from"):
        data.read_source(_write(tmp_path), images=True)


def _write(tmp_path: Path) -> Path:
    (tmp_path / "x.txt").write_text("a prompt\n")
    return tmp_path / "x.txt"


def test_embeddings_match_the_text_encoder_and_a_cache_of_another_model_is_refused(work):
    emb = data.Embeddings(work / "emb")
    teacher = sd.load_sd(work / "tiny")
    with torch.no_grad():
        ref = teacher.text.embed(PROMPTS)
        null = teacher.text.embed([""])
    assert emb.n == 3 and emb.prompts() == PROMPTS
    torch.testing.assert_close(emb.text(torch.tensor([2, 0, 1])), ref[[2, 0, 1]])
    torch.testing.assert_close(emb.null, null)
    before = _files(work / "emb")
    with pytest.raises(CacheMismatch, match="text_encoder.*left untouched"):
        data.build_embeddings(work / "other", work / "prompts.txt", work / "emb", shard_size=2, device="cpu",
                              dtype="float32", progress=False)
    assert _files(work / "emb") == before


def test_image_latents_are_the_vae_encoding(work, tmp_path):
    _tar(tmp_path / "s.tar", {"a.txt": b"red", "a.png": _png("red"), "b.txt": b"green", "b.png": _png("green")})
    data.build_embeddings(work / "tiny", tmp_path / "s.tar", tmp_path / "emb", images=True, resolution=16,
                          device="cpu", dtype="float32", progress=False)
    emb = data.Embeddings(tmp_path / "emb")
    vae = sd.load_sd(work / "tiny").vae
    imgs = torch.stack([data.load_image(_png(c), 16) for c in ("red", "green")])
    with torch.no_grad():
        torch.testing.assert_close(emb.latents(torch.tensor([0, 1])), vae.encode(imgs))


def test_a_folder_that_is_not_an_sd_pipeline_is_a_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a diffusers Stable Diffusion pipeline folder"):
        data.main(["--model", str(tmp_path / "model"), "--prompts", str(_write(tmp_path)), "--out",
                   str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# triplets
# ---------------------------------------------------------------------------------------------------------------

def _all(folder: Path) -> dict[str, torch.Tensor]:
    t = triplets.Triplets(folder)
    eps, x0, p = t.rows(torch.arange(t.n))
    return {"eps": eps, "x0": x0, "prompt": p}


def test_triplets_are_the_guided_teachers_dpm_solver_solution_from_per_index_noise(work):
    from course_lib import grids, guidance, samplers

    got = _all(work / "tri")
    assert got["eps"].shape == (10, 4, 8, 8) and got["prompt"].tolist() == [i % 3 for i in range(10)]
    torch.testing.assert_close(got["eps"][7], triplets.noise(0, [7], (4, 8, 8))[0], rtol=0, atol=0)
    teacher = sd.load_sd(work / "tiny")
    c = data.Embeddings(work / "emb").cond(torch.tensor([1]))
    with torch.no_grad():
        x0 = samplers.dpm_solver_pp_2m(guidance.cfg(teacher.model, 1.0), got["eps"][7:8],
                                       grids.default_grid(3, teacher.model.process), teacher.model.process, cond=c)
    torch.testing.assert_close(got["x0"][7:8], x0, rtol=1e-4, atol=1e-4)     # batch of 2 there, 1 here


@pytest.mark.slow
def test_resumed_and_two_process_generation_equal_one_uninterrupted_process(work, tmp_path):
    ref = _all(work / "tri")
    args = dict(n=10, w=1.0, steps=3, shard_size=4, batch_size=2, device="cpu", progress=False)
    triplets.generate_triplets(work / "tiny", work / "emb", tmp_path / "resumed", max_shards=1, **args)  # "killed"
    assert sorted(p.name for p in (tmp_path / "resumed").glob("tri-*")) == ["tri-00000.safetensors"]
    (tmp_path / "resumed" / "tri-00001.safetensors.tmp").write_bytes(b"half a file")               # torn write
    with pytest.raises(SourceError, match="2 of 3 triplet shards are missing"):
        triplets.Triplets(tmp_path / "resumed")
    first = (tmp_path / "resumed" / "tri-00000.safetensors").stat().st_mtime_ns
    triplets.generate_triplets(work / "tiny", work / "emb", tmp_path / "resumed", **args)
    assert (tmp_path / "resumed" / "tri-00000.safetensors").stat().st_mtime_ns == first             # skipped
    for k, v in _all(tmp_path / "resumed").items():
        assert torch.equal(v, ref[k]), k

    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "course_lib.scale.triplets", "--teacher",
           str(work / "tiny"), "--embeddings", str(work / "emb"), "--out", str(tmp_path / "two"), "--count", "10",
           "--w", "1.0", "--steps", "3", "--shard-size", "4", "--batch-size", "2", "--device", "cpu", "--no-progress",
           "--model-dtype", "float32", "--store-dtype", "float32"]    # (the shipped config is for SD 1.5 on GPUs: fp16)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("Gloo", "gloo", "EADDRINUSE", "rendezvous")):
        pytest.skip(f"torchrun could not start two gloo processes here:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for k, v in _all(tmp_path / "two").items():
        assert torch.equal(v, ref[k]), k


def test_a_triplet_cache_of_another_teacher_or_guidance_is_refused_untouched(work):
    before = _files(work / "tri")
    args = dict(n=10, steps=3, shard_size=4, batch_size=2, device="cpu", progress=False)
    with pytest.raises(CacheMismatch, match=r"w: 1\.0 \(cache\) != 2\.0"):
        triplets.generate_triplets(work / "tiny", work / "emb", work / "tri", w=2.0, **args)
    with pytest.raises(CacheMismatch, match="unet"):
        triplets.generate_triplets(work / "other", work / "emb", work / "tri", w=1.0, **args)
    assert _files(work / "tri") == before


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------

def _perturb(module, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_a_plain_diffusers_pipeline_takes_the_students_one_euler_step(work, tmp_path):
    from diffusers import StableDiffusionPipeline

    from course_lib.distill.instaflow import one_step

    teacher = sd.load_sd(work / "tiny")
    student = sd.as_rectified_flow(teacher.model)
    _perturb(student)                                                       # stands in for training
    export.export_student(teacher, student, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")   # no course code involved
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    x1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = teacher.text(PROMPTS[:2])
    with torch.no_grad():
        ref = pipe(prompt_embeds=c.text, latents=x1.clone(), num_inference_steps=1, guidance_scale=1.0,
                   output_type="latent").images
        mine = one_step(student, x1, c)
        images = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
    err = float((ref - mine).abs().max())
    assert err <= 1e-4 * max(1.0, float(mine.abs().max())), err             # UniPC's first sigma is 1 - 1e-6
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    again = sd.load_sd(tmp_path / "pipeline").model                         # and the course reads it as a flow
    assert again.parameterization == "velocity" and again.process.name == "rf"


def test_lora_exports_load_in_diffusers_in_both_formats_and_refuse_another_base(work, tmp_path):
    from diffusers import StableDiffusionPipeline

    teacher = sd.load_sd(work / "tiny")
    student = sd.add_lora(sd.as_rectified_flow(teacher.model), r=4, alpha=8)
    _perturb(student, 0.05)
    folder = export.export_student(teacher, student, tmp_path)
    kohya = load_file(str(folder / export.KOHYA_FILE))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    assert {k.rsplit(".", 1)[0].split(".", 1)[1] if k.count(".") > 1 else k.split(".", 1)[1] for k in kohya} == {
        "lora_down", "lora_up", "alpha"}
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.4])
    text = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = student.unet(x, 1000 * t - 1, encoder_hidden_states=text).sample
        base = StableDiffusionPipeline.from_pretrained(work / "tiny").unet(x, 1000 * t - 1, encoder_hidden_states=text)
        assert float((base.sample - want).abs().max()) > 1e-3               # the adapter matters: the test has teeth
        for source in (folder, folder / export.KOHYA_FILE):           # diffusers' own loader, both key formats
            pipe = StableDiffusionPipeline.from_pretrained(work / "tiny", safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.load_lora_weights(str(source))
            torch.testing.assert_close(pipe.unet(x, 1000 * t - 1, encoder_hidden_states=text).sample, want,
                                       rtol=1e-5, atol=1e-5)
        pipe = export.load_lora_checked(work / "tiny", folder)
        assert pipe.scheduler.config.prediction_type == "flow_prediction"
    back, alphas = export.from_kohya(kohya, [n for n, _ in student.unet.named_modules()])
    assert set(alphas.values()) == {8.0} and len(back) == len(kohya) * 2 // 3
    before = _files(folder)
    with pytest.raises(SourceError, match="trained on another base model"):
        export.load_lora_checked(work / "other", folder)
    assert _files(folder) == before


def test_config_files_give_defaults_flags_win_and_typos_are_errors(tmp_path):
    from course_lib.scale import common

    def add(ap):
        common.needed(ap, "--model")
        ap.add_argument("--shard-size", type=int, default=7)

    (tmp_path / "ok.json").write_text(json.dumps({"model": "m", "shard_size": 3, "_comment": "ignored"}))
    a = common.parse("data", "", add, ["--config", str(tmp_path / "ok.json")])
    assert (a.model, a.shard_size) == ("m", 3)
    assert common.parse("data", "", add, ["--config", str(tmp_path / "ok.json"), "--shard-size", "5"]).shard_size == 5
    (tmp_path / "typo.json").write_text(json.dumps({"model": "m", "shard_sise": 3}))
    with pytest.raises(SystemExit, match="unknown settings.*shard_sise"):
        common.parse("data", "", add, ["--config", str(tmp_path / "typo.json")])
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(SystemExit):
        common.parse("data", "", add, ["--config", str(tmp_path / "none.json")])       # --model is needed
    for stage in ("data", "triplets", "instaflow_reflow", "instaflow_distill"):                           # the shipped configs parse
        assert common.load_config(stage)


def test_a_resaved_tokenizer_keeps_its_fingerprint(tmp_path):
    """transformers re-saves a tokenizer as tokenizer.json + tokenizer_config.json only: a stage's exported pipeline
    must still match the embedding cache made with the teacher's tokenizer (the mini SD's learned merges included);
    another tokenizer must not."""
    from course_lib import minisd, sd
    from course_lib.scale.common import fingerprint_folder

    mini = sd.load_sd(minisd.MINI_SD)
    mini.text.tokenizer.save_pretrained(tmp_path / "resaved")
    assert fingerprint_folder(minisd.MINI_SD / "tokenizer") == fingerprint_folder(tmp_path / "resaved")
    sd.tiny_sd_pipeline().tokenizer.save_pretrained(tmp_path / "tiny")
    assert fingerprint_folder(tmp_path / "tiny") != fingerprint_folder(tmp_path / "resaved")


def test_a_component_resaved_by_another_library_version_keeps_its_fingerprint(tmp_path):
    """The fingerprint is the component's content: a re-save that only changes the writing library's version stamp
    (transformers_version, _diffusers_version, _name_or_path) keeps it; changed weights or a changed config value
    change it, and the refusal names which (the weights, the config key with both values)."""
    from course_lib import minisd
    from course_lib.scale.common import check_key, describe_folder, explain_difference, fingerprint_folder

    for part, stamp in (("text_encoder", "transformers_version"), ("unet", "_diffusers_version")):
        shutil.copytree(minisd.MINI_SD / part, tmp_path / part)
        cfg = json.loads((tmp_path / part / "config.json").read_text())
        cfg.update({stamp: "99.0.0", "_name_or_path": "/somewhere/else"})
        (tmp_path / part / "config.json").write_text(json.dumps(cfg, indent=4))
        assert fingerprint_folder(tmp_path / part) == fingerprint_folder(minisd.MINI_SD / part), part
        assert describe_folder(tmp_path / part) == describe_folder(minisd.MINI_SD / part), part

    original = describe_folder(minisd.MINI_SD / "text_encoder")
    cfg = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 1e-6}))
    assert fingerprint_folder(tmp_path / "text_encoder") != fingerprint_folder(minisd.MINI_SD / "text_encoder")
    assert explain_difference(original, describe_folder(tmp_path / "text_encoder")) == \
        ["config.json key 'layer_norm_eps': 1e-05 (cache) != 1e-06 (this run)"]

    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights))
    assert fingerprint_folder(tmp_path / "unet") != fingerprint_folder(minisd.MINI_SD / "unet")
    found, wanted = ({"unet": fingerprint_folder(f / "unet"), "detail": {"unet": describe_folder(f / "unet")}}
                     for f in (minisd.MINI_SD, tmp_path))
    with pytest.raises(CacheMismatch, match=r"unet: the weights differ\)"):
        check_key(found, wanted, "triplets", tmp_path / "index.json", "")
    # a cache written before the details were kept: the two fingerprints
    with pytest.raises(CacheMismatch, match=rf"unet: '{found['unet']}' \(cache\) != '{wanted['unet']}' \(this run\)"):
        check_key({"unet": found["unet"]}, wanted, "triplets", tmp_path / "index.json", "")
