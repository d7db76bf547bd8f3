"""engine.catalog: webui names, hashes and aliases of the model files on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from engine import catalog as catalog_mod
from engine.catalog import Catalog, CheckpointInfo, HashCache, hash_file
from engine.errors import ModelLoadError, UnknownName

EMPTY_OLDHASH = hashlib.sha256(b"").hexdigest()[:8]


def put(root: Path, rel: str, data: bytes | None = None) -> Path:
    """Write a small fake model file (the catalog never parses contents)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rel.encode() if data is None else data)
    return path


def put_diffusers(root: Path, rel: str) -> Path:
    folder = root / rel
    put(folder, "model_index.json", b"{}")
    put(folder, "unet/diffusion_pytorch_model.safetensors", b"unet")
    return folder


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def webui_oldhash(path: Path) -> str:
    """webui's sd_models.model_hash, written out the way webui does it."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


# --------------------------------------------------------------------------- names


def test_names_of_a_file_in_a_subfolder(models: Path) -> None:
    data = b"my model bytes"
    path = put(models, "checkpoints/sub/dir/My Model.safetensors", data)
    (info,) = Catalog.scan(models).checkpoints
    short = sha(data)[:10]
    assert info.filename == path.absolute()
    assert info.filename.is_absolute()
    assert info.name == "sub/dir/My Model.safetensors"
    assert info.name_for_extra == "My Model"
    assert info.model_name == "sub_dir_My Model"
    assert info.title == f"sub/dir/My Model.safetensors [{short}]"
    assert not info.is_folder


def test_diffusers_folder_is_one_checkpoint_without_hash(models: Path) -> None:
    folder = put_diffusers(models, "checkpoints/sub/my-diffusers")
    (info,) = Catalog.scan(models).checkpoints  # the unet file inside is not listed
    assert info.filename == folder.absolute()
    assert info.is_folder
    assert info.name == "sub/my-diffusers"
    assert info.name_for_extra == "my-diffusers"
    assert info.model_name == "sub_my-diffusers"
    assert (info.sha256, info.shorthash, info.oldhash) == (None, None, None)
    assert info.title == "sub/my-diffusers"
    assert info.aliases == ("sub_my-diffusers", "sub/my-diffusers", "my-diffusers")


# --------------------------------------------------------------------------- hashes


@pytest.mark.parametrize(
    "size",
    [0, 10, 0x100000, 0x100000 + 10, 0x110000 - 1, 0x110000, 0x120000 + 7, 3 * 0x100000 + 1],
)
def test_hashes_match_hashlib_and_webui_oldhash(tmp_path: Path, size: int) -> None:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    path = put(tmp_path, "m.safetensors", data)
    got = hash_file(path)
    assert got.sha256 == sha(data)
    assert got.oldhash == webui_oldhash(path)


def test_checkpoint_hashes_and_oldhash_by_hand(models: Path) -> None:
    # > 0x110000 bytes so the legacy window [1 MiB, 1 MiB + 64 KiB) is full.
    data = bytes(range(256)) * (0x118000 // 256)
    put(models, "checkpoints/big.safetensors", data)
    (info,) = Catalog.scan(models).checkpoints
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.shorthash == info.sha256[:10]
    assert info.oldhash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_short_file_oldhash_hashes_nothing(models: Path) -> None:
    put(models, "checkpoints/tiny.ckpt", b"tiny")
    (info,) = Catalog.scan(models).checkpoints
    assert info.oldhash == EMPTY_OLDHASH


# --------------------------------------------------------------------------- aliases


ALIAS_KINDS = {
    "oldhash": lambda c: c.oldhash,
    "model_name": lambda c: c.model_name,
    "title": lambda c: c.title,
    "name": lambda c: c.name,
    "name_for_extra": lambda c: c.name_for_extra,
    "name [oldhash]": lambda c: f"{c.name} [{c.oldhash}]",
    "shorthash": lambda c: c.shorthash,
    "sha256": lambda c: c.sha256,
    "name [shorthash]": lambda c: f"{c.name} [{c.shorthash}]",
    "name_for_extra [shorthash]": lambda c: f"{c.name_for_extra} [{c.shorthash}]",
}


@pytest.fixture
def two(models: Path) -> Catalog:
    # past 0x110000 bytes, so the two legacy oldhashes differ too
    put(models, "checkpoints/alpha.safetensors", b"alpha" * 0x40000)
    put(models, "checkpoints/sub/Beta Model.ckpt", b"beta" * 0x50000)
    return Catalog.scan(models)


@pytest.mark.parametrize("kind", list(ALIAS_KINDS))
def test_every_alias_kind_resolves_to_its_file(two: Catalog, kind: str) -> None:
    for info in two.checkpoints:
        alias = ALIAS_KINDS[kind](info)
        assert alias in info.aliases
        assert two.resolve_checkpoint(alias) is info


def test_aliases_are_webui_ids_in_order_without_repeats(two: Catalog) -> None:
    info = two.checkpoints[1]
    expected = tuple(dict.fromkeys(ALIAS_KINDS[k](info) for k in ALIAS_KINDS))
    assert info.aliases == expected
    assert len(expected) == len(ALIAS_KINDS) - 1  # "name [shorthash]" is the title


def test_small_files_share_the_empty_oldhash_and_it_names_the_first(models: Path) -> None:
    # webui quirk: every file under 1 MiB has the same legacy hash
    put(models, "checkpoints/b.safetensors", b"b")
    put(models, "checkpoints/a.safetensors", b"a")
    cat = Catalog.scan(models)
    assert {c.oldhash for c in cat.checkpoints} == {EMPTY_OLDHASH}
    assert cat.resolve_checkpoint(EMPTY_OLDHASH).name == "a.safetensors"


def test_unknown_checkpoint_names_field_value_and_titles(two: Catalog) -> None:
    with pytest.raises(UnknownName) as err:
        two.resolve_checkpoint("nope")
    message = str(err.value)
    assert "override_settings.sd_model_checkpoint" in message
    assert "'nope'" in message
    for title in two.titles:
        assert title in message
    assert err.value.choices == two.titles


def test_unknown_checkpoint_uses_the_given_field(two: Catalog) -> None:
    with pytest.raises(UnknownName, match=r"^Invalid request: hr_checkpoint_name: got 'x'"):
        two.resolve_checkpoint("x", field="hr_checkpoint_name")


def test_traversal_and_path_names_never_match(models: Path, two: Catalog) -> None:
    outside = put(models, "outside.safetensors", b"outside")
    real = two.checkpoints[0].filename
    for name in [
        "../outside.safetensors",
        "checkpoints/../../outside.safetensors",
        "../x.safetensors",
        str(outside),
        str(real),  # the absolute path of a real checkpoint is not one of its ids
        "/etc/passwd",
        "alpha.safetensors\x00",
        "alpha\x00.safetensors",
        "",
        " alpha.safetensors",
        "ALPHA.safetensors",  # exact match, like webui
    ]:
        with pytest.raises(UnknownName):
            two.resolve_checkpoint(name)


def test_non_string_name_is_unknown_not_a_crash(two: Catalog) -> None:
    with pytest.raises(UnknownName):
        two.resolve_checkpoint(["alpha"])  # type: ignore[arg-type]


def test_shared_short_name_goes_to_first_file_and_full_name_wins(models: Path) -> None:
    put(models, "checkpoints/a/model.safetensors", b"a")
    put(models, "checkpoints/b/model.safetensors", b"b")
    put(models, "checkpoints/0/mydiff.safetensors", b"0")
    put_diffusers(models, "checkpoints/mydiff")
    cat = Catalog.scan(models)
    assert cat.resolve_checkpoint("model").name == "a/model.safetensors"
    assert cat.resolve_checkpoint("b/model.safetensors").name == "b/model.safetensors"
    # "mydiff" is the folder's exact name and only a basename of 0/mydiff.safetensors
    assert cat.resolve_checkpoint("mydiff").name == "mydiff"
    assert cat.resolve_checkpoint("0/mydiff.safetensors").name == "0/mydiff.safetensors"


# --------------------------------------------------------------------------- hash cache


class CountingHash:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> catalog_mod.FileHashes:
        self.paths.append(path)
        return hash_file(path)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingHash:
    counter = CountingHash()
    monkeypatch.setattr(catalog_mod, "hash_file", counter)
    return counter


def test_warm_cache_survives_restart_without_rehashing(
    models: Path, counting: CountingHash
) -> None:
    put(models, "checkpoints/one.safetensors", b"one")
    put(models, "checkpoints/two.safetensors", b"two")
    cache_file = models / ".cache" / "hashes.json"
    first = Catalog.scan(models, hash_cache=HashCache(cache_file, root=models))
    assert len(counting.paths) == 2
    saved = json.loads(cache_file.read_text())
    # Keyed by the path inside the models folder: valid wherever the folder is copied.
    entry = saved["checkpoints/one.safetensors"]
    assert entry["sha256"] == sha(b"one")
    assert entry["size"] == 3

    second = Catalog.scan(models, hash_cache=HashCache(cache_file, root=models))  # a restart
    assert len(counting.paths) == 2
    assert second.checkpoints == first.checkpoints


@pytest.mark.parametrize("change", ["content_and_size", "same_size"])
def test_touched_file_is_rehashed(models: Path, counting: CountingHash, change: str) -> None:
    path = put(models, "checkpoints/m.safetensors", b"old")
    cache_file = models / ".cache" / "hashes.json"
    Catalog.scan(models, hash_cache=HashCache(cache_file))
    st = os.stat(path)
    if change == "content_and_size":
        path.write_bytes(b"new content")
    else:
        path.write_bytes(b"NEW")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (info,) = Catalog.scan(models, hash_cache=HashCache(cache_file)).checkpoints
    assert len(counting.paths) == 2
    assert info.sha256 == sha(path.read_bytes())


def test_unwritable_cache_warns_and_keeps_going_in_memory(
    models: Path, counting: CountingHash, caplog: pytest.LogCaptureFixture
) -> None:
    put(models, "checkpoints/m.safetensors", b"m")
    blocker = put(models, "not-a-dir", b"")
    cache = HashCache(blocker / "hashes.json")  # its parent is a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="engine.catalog"):
        (info,) = Catalog.scan(models, hash_cache=cache).checkpoints
    assert info.sha256 == sha(b"m")
    assert "cannot write hash cache" in caplog.text
    Catalog.scan(models, hash_cache=cache)  # still cached in memory
    assert len(counting.paths) == 1


def test_corrupt_cache_file_is_ignored(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    put(models, "checkpoints/m.safetensors", b"m")
    cache_file = put(models, ".cache/hashes.json", b"{not json")
    with caplog.at_level(logging.WARNING, logger="engine.catalog"):
        (info,) = Catalog.scan(models, hash_cache=HashCache(cache_file)).checkpoints
    assert info.sha256 == sha(b"m")
    assert "unreadable" in caplog.text
    assert json.loads(cache_file.read_text())  # rewritten with a good entry


def test_cache_entry_with_wrong_hash_shape_is_recomputed(models: Path) -> None:
    path = put(models, "checkpoints/m.safetensors", b"m")
    st = os.stat(path)
    cache_file = models / "hashes.json"
    cache_file.write_text(json.dumps({str(path.absolute()): {"size": st.st_size, "probe": "x"}}))
    (info,) = Catalog.scan(models, hash_cache=HashCache(cache_file)).checkpoints
    assert info.sha256 == sha(b"m")


# --------------------------------------------------------------------------- walking


def test_symlinks_out_of_the_folder_are_skipped(
    tmp_path: Path, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = put(tmp_path, "elsewhere/secret.safetensors", b"secret")
    put(tmp_path, "elsewhere/dir/inner.safetensors", b"inner")
    put(models, "checkpoints/real.safetensors", b"real")
    ckpts = models / "checkpoints"
    (ckpts / "link.safetensors").symlink_to(secret)
    (ckpts / "linkdir").symlink_to(tmp_path / "elsewhere" / "dir")
    (ckpts / "inside.safetensors").symlink_to(ckpts / "real.safetensors")
    (ckpts / "loop").symlink_to(ckpts)  # would recurse forever if followed
    with caplog.at_level(logging.WARNING, logger="engine.catalog"):
        cat = Catalog.scan(models)
    assert [c.name for c in cat.checkpoints] == ["inside.safetensors", "real.safetensors"]
    assert "points outside" in caplog.text
    with pytest.raises(UnknownName):
        cat.resolve_checkpoint("link.safetensors")


def test_hidden_and_foreign_files_are_skipped_and_order_ignores_case(models: Path) -> None:
    for rel in [
        "b.safetensors",
        "A.safetensors",
        "c/a.ckpt",
        "C.pt",
        "D.SAFETENSORS",
        ".hidden.safetensors",
        ".git/x.safetensors",
        "notes.txt",
        "A.yaml",
        "vae.bin",  # .bin is not a checkpoint suffix
    ]:
        put(models / "checkpoints", rel)
    cat = Catalog.scan(models)
    assert [c.name for c in cat.checkpoints] == [
        "A.safetensors",
        "b.safetensors",
        "C.pt",
        "c/a.ckpt",
        "D.SAFETENSORS",
    ]


# --------------------------------------------------------------------------- defaults


def test_default_checkpoint_is_first_by_name_or_preferred(two: Catalog) -> None:
    assert two.default_checkpoint().name == "alpha.safetensors"
    beta = two.checkpoints[1]
    assert two.default_checkpoint("Beta Model") is beta
    assert two.default_checkpoint(beta.title) is beta


def test_unknown_preferred_checkpoint_names_the_setting(two: Catalog) -> None:
    with pytest.raises(ModelLoadError) as err:
        two.default_checkpoint("missing", setting="SD_DEFAULT_CHECKPOINT")
    message = str(err.value)
    assert "SD_DEFAULT_CHECKPOINT" in message
    assert "'missing'" in message
    assert two.titles[0] in message


@pytest.mark.parametrize("make_folder", [True, False])
def test_no_checkpoint_says_where_it_looked(models: Path, make_folder: bool) -> None:
    if make_folder:
        (models / "checkpoints").mkdir(parents=True)
    cat = Catalog.scan(models)
    assert cat.checkpoints == ()
    assert cat.sd_models_listing() == []
    with pytest.raises(ModelLoadError, match="no checkpoint found in") as err:
        cat.default_checkpoint()
    assert str(models / "checkpoints") in str(err.value)
    assert ".safetensors" in str(err.value)


# --------------------------------------------------------------------------- listings


def test_sd_models_listing_shape(models: Path) -> None:
    put(models, "checkpoints/sub/m.safetensors", b"m")
    yaml = put(models, "checkpoints/sub/m.yaml", b"model: {}")
    put_diffusers(models, "checkpoints/z-diff")
    listing = Catalog.scan(models).sd_models_listing()
    short = sha(b"m")[:10]
    assert listing == [
        {
            "title": f"sub/m.safetensors [{short}]",
            "model_name": "sub_m",
            "hash": short,
            "sha256": sha(b"m"),
            "filename": str(models / "checkpoints" / "sub" / "m.safetensors"),
            "config": str(yaml),
        },
        {
            "title": "z-diff",
            "model_name": "z-diff",
            "hash": None,
            "sha256": None,
            "filename": str(models / "checkpoints" / "z-diff"),
            "config": None,
        },
    ]
    json.dumps(listing)  # JSON-ready as is


def test_files_lists_each_kind_sorted(models: Path) -> None:
    put(models, "loras/Zeta.safetensors")
    put(models, "loras/style/alpha.pt")
    put(models, "loras/readme.md")
    put(models, "embeddings/bad-hands.bin")
    put(models, "vae/vae-ft-mse.ckpt")
    put(models, "controlnet/.hidden.safetensors")
    cat = Catalog.scan(models)
    assert [p.relative_to(models).as_posix() for p in cat.files("loras")] == [
        "loras/style/alpha.pt",
        "loras/Zeta.safetensors",
    ]
    assert [p.name for p in cat.files("embeddings")] == ["bad-hands.bin"]
    assert [p.name for p in cat.files("vae")] == ["vae-ft-mse.ckpt"]
    assert cat.files("controlnet") == ()
    with pytest.raises(ValueError, match="checkpoints"):
        cat.files("checkpoints")


def test_checkpoint_info_is_frozen(two: Catalog) -> None:
    info: CheckpointInfo = two.checkpoints[0]
    with pytest.raises(AttributeError):
        info.name = "x"  # type: ignore[misc]


def test_cache_moves_with_the_models_folder_and_ignores_mtime(
    models: Path, tmp_path: Path, counting: CountingHash
) -> None:
    """What a built image gets: the folder (with its cache) copied elsewhere, new mtimes."""
    put(models, "checkpoints/sub/a.safetensors", b"a" * 200_000)
    Catalog.scan(models, hash_cache=HashCache(models / ".cache" / "hashes.json", root=models))
    assert len(counting.paths) == 1
    copy = tmp_path / "image" / "src"
    shutil.copytree(models, copy)  # copytree keeps mtimes; move them on to be sure
    target = copy / "checkpoints" / "sub" / "a.safetensors"
    os.utime(target, ns=(1, 1))
    cache = HashCache(copy / ".cache" / "hashes.json", root=copy)
    (info,) = Catalog.scan(copy, hash_cache=cache).checkpoints
    assert len(counting.paths) == 1 and info.sha256 == sha(b"a" * 200_000)
    # Same size, different tail (two fine-tunes of one architecture): hashed again.
    target.write_bytes(b"a" * 199_999 + b"b")
    (info,) = Catalog.scan(copy, hash_cache=cache).checkpoints
    assert len(counting.paths) == 2 and info.sha256 == sha(b"a" * 199_999 + b"b")


def test_read_only_cache_file_is_still_used(models: Path, counting: CountingHash) -> None:
    put(models, "checkpoints/m.safetensors", b"m")
    cache_file = models / ".cache" / "hashes.json"
    Catalog.scan(models, hash_cache=HashCache(cache_file, root=models))
    cache_file.chmod(0o444)
    cache_file.parent.chmod(0o555)
    try:
        Catalog.scan(models, hash_cache=HashCache(cache_file, root=models))
    finally:
        cache_file.parent.chmod(0o755)
    assert len(counting.paths) == 1
