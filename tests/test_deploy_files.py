"""What `cog build` would do with this folder: cog.yaml against Cog's schema, the build context
that .dockerignore leaves, and the CLIP vocabulary that ships instead of a package."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from engine import clip_vocab
from scripts.make_tiny_models import make_all

ROOT = Path(__file__).resolve().parent.parent
# Cog's JSON schema for cog.yaml: replicate/cog pkg/config/data/config_schema_v1.0.json (the
# same JSON as in Cog's repository at the newest snapshot read, 2026-08).
COG_CONFIG_SCHEMA = Path(__file__).resolve().parent / "data" / "cog_config_schema.json"
# Names Cog refuses in `environment:` (replicate/cog pkg/config/env.go).
COG_ENV_DENIED = re.compile(
    r"^(PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|PYTHONUNBUFFERED|LIBRARY_PATH|HF_ENDPOINT|"
    r"HF_HUB_ENABLE_HF_TRANSFER|R8_.*|REPLICATE_.*|CUDA_.*|NVIDIA_.*|NV_.*|PGET_.*|KUBERNETES_.*)$"
)


def cog_config() -> dict:
    return dict(yaml.safe_load((ROOT / "cog.yaml").read_text()))


def test_cog_yaml_is_valid_for_cogs_config_schema() -> None:
    schema = json.loads(COG_CONFIG_SCHEMA.read_text())
    jsonschema.validate(cog_config(), schema)
    # The schema is strict (additionalProperties: false): a misspelt key would fail above.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cog_config(), "enviroment": ["A=1"]}, schema)


def test_cog_yaml_has_no_bare_pip_step_and_sets_the_runtime_environment() -> None:
    config = cog_config()
    # The CUDA 13 base images' Python is externally managed: a bare `pip install` is refused.
    for step in config["build"].get("run") or []:
        command = step if isinstance(step, str) else step["command"]
        assert not re.search(r"(^|[;&|]\s*)pip3?\s", command), command
    environment = dict(item.split("=", 1) for item in config["environment"])
    assert environment["HF_HUB_OFFLINE"] == "1"
    assert environment["SD_DEVICE"] == "cuda"
    assert environment["OMP_NUM_THREADS"] == "1"  # one OpenMP team per request thread
    assert not [name for name in environment if COG_ENV_DENIED.match(name)]


def test_no_requirement_installs_open_clip() -> None:
    for name in ("requirements.txt", "requirements-cuda.txt", "Makefile", "cog.yaml"):
        text = (ROOT / name).read_text()
        assert not re.search(r"^[^#]*open-clip-torch", text, re.MULTILINE), name


def test_clip_vocabulary_ships_in_the_repository() -> None:
    path = clip_vocab.find_bpe_file()
    assert ROOT in path.parents
    # OpenAI CLIP's file, byte for byte (the same bytes open-clip-torch 3.3.0 ships).
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    vocab, _ = clip_vocab.vocab_and_merges()
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407


# --------------------------------------------------------------------------- .dockerignore


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, as Docker reads them (moby patternmatcher:
    filepath.Match syntax, `**` for any number of folders, `!` re-includes, a leading `/` is
    dropped, the last matching line wins)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip().lstrip("/").rstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exclude, re.compile(regex + r"\Z")))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `rel` out of the build context: a pattern matches the path or
    one of its parent folders; the last pattern that matches decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exclude, regex in rules:
        if any(regex.match(c) for c in candidates):
            result = exclude
    return result


KEPT_OUT = [
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".git/HEAD",
    "engine/__pycache__/api.cpython-311.pyc",
    ".mypy_cache/3.11/engine/api.data.json",
    ".ruff_cache/CACHEDIR.TAG",
    ".pytest_cache/v/cache/lastfailed",
    ".cache/configs/sd1/tokenizer/vocab.json",
    "output/txt2img-1234.png",
    "tests/test_http.py",
    "tests/data/cog_config_schema.json",
    ".tiny-models/checkpoints/tiny-sd15.safetensors",
]
KEPT_IN = [
    "predict.py",
    "cog.yaml",
    "requirements-cuda.txt",
    "engine/api.py",
    "engine/vocab/bpe_simple_vocab_16e6.txt.gz",
    "engine/configs/sd1/unet/config.json",
    "extensions/controlnet/extension.py",
    "scripts/fetch_models.py",
    "models.toml",
    "checkpoints/realisticVision.safetensors",
    "checkpoints/sdxl/juggernaut.safetensors",
    "loras/detail.safetensors",
    "upscalers/RealESRGAN_x4plus.pth",
    "vae/sdxl_vae.safetensors",
    # The shipped hash cache: a fresh container hashes nothing.
    ".cache/hashes.json",
]


@pytest.mark.parametrize("rel", KEPT_OUT)
def test_dockerignore_keeps_out(rel: str) -> None:
    assert excluded(rel, dockerignore_rules())


@pytest.mark.parametrize("rel", KEPT_IN)
def test_dockerignore_keeps_in(rel: str) -> None:
    assert not excluded(rel, dockerignore_rules())


def tiny_models_folder_of_make_run() -> str:
    """The folder `make run` writes the tiny models into, read from make's dry run with an
    empty checkpoints/ (the only case in which it writes them)."""
    dry = subprocess.run(
        ["make", "-n", "-B", "models", "run"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    if any(
        p.suffix in {".safetensors", ".ckpt", ".pt"} or (p / "model_index.json").is_file()
        for p in (ROOT / "checkpoints").iterdir()
    ):
        pytest.fail("checkpoints/ holds a model here: cannot dry-run the tiny-model path")
    (line,) = [ln for ln in dry.splitlines() if "make_tiny_models.py" in ln]
    words = shlex.split(line.replace(";", " ").replace("}", " "))
    folder = words[words.index(next(w for w in words if w.endswith("make_tiny_models.py"))) + 1]
    (run_line,) = [ln for ln in dry.splitlines() if "run_example.py" in ln]
    assert f"SD_MODELS_DIR={folder} " in run_line  # make run serves what it wrote
    return folder


def test_make_runs_tiny_models_can_never_be_baked_into_an_image(tmp_path: Path) -> None:
    folder = tiny_models_folder_of_make_run()
    # Not the repository root (whose checkpoints/ an image serves by default).
    assert Path(folder).resolve() != ROOT.resolve() and folder not in {".", "./"}
    written = make_all(tmp_path, seed=0)
    assert written
    rules = dockerignore_rules()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            rel = f"{folder.strip('/')}/{path.relative_to(tmp_path).as_posix()}"
            assert excluded(rel, rules), rel
