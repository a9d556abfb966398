#!/usr/bin/env bash
# A regular (non-editable) install of mae_fast works outside the source checkout. Builds one wheel (with
# .venv's torch, no build isolation; the CUDA extension as MAE_FAST_BUILD_CUDA / TORCH_CUDA_ARCH_LIST say)
# from a copy of the checkout's files, installs it with pip --target into a temporary folder, and from a
# temporary working directory, with PYTHONPATH naming that folder only, checks that:
#   - every source file of mae_fast/ and kernels/ and every data file is installed, and every module is
#     imported from there (not from the checkout), mae_fast._C too when the wheel has it;
#   - python -m mae_fast info, pretrain --help, finetune --help, eval --help, visualize --help exit 0;
#   - python -m mae_fast bench exits 2 and says that it needs a source checkout;
#   - the generated mae-fast console script lists the subcommands, runs eval --help and refuses bench alike.
# The interpreter is a throwaway venv of .venv's Python that sees .venv's site-packages through a plain
# path line, so .venv's editable-install hook (which maps mae_fast to the checkout) is not active there.
# Run by scripts/test.sh before pytest; on its own: bash scripts/check_install.sh. Exits 1 on failure.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
  echo "check_install: FAILED: $*" >&2
  exit 1
}
say() {
  echo "check_install: $*"
}

[ -x .venv/bin/python ] || fail ".venv is missing: run scripts/setup_env.sh first"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

# the files a clone has (tracked and untracked-but-not-ignored), so no build/ or in-place _C leftovers
mkdir -p "$tmp/src"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' path; do [ -e "$path" ] && printf '%s\0' "$path"; done |
  tar --null -T - -cf - | tar -xf - -C "$tmp/src" || fail "could not copy the checkout's files (git ls-files needs a git checkout)"

say "building the wheel (MAE_FAST_BUILD_CUDA=${MAE_FAST_BUILD_CUDA:-auto} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-})"
build_start=$SECONDS
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src" >"$tmp/build.log" 2>&1 || {
  tail -n 40 "$tmp/build.log" >&2
  fail "pip wheel of the checkout failed"
}
wheel=$(ls "$tmp"/dist/mae_fast-*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || fail "pip wheel wrote no mae_fast wheel"
say "built $(basename "$wheel") in $((SECONDS - build_start)) s"
.venv/bin/pip install -q --no-deps --no-index --target "$tmp/site" "$wheel" || fail "pip install --target of the wheel failed"

site_packages=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
.venv/bin/python -m venv --without-pip "$tmp/venv" || fail "could not create the throwaway venv"
python=$tmp/venv/bin/python
echo "$site_packages" >"$("$python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/dot_venv.pth"
mkdir "$tmp/work"
cd "$tmp/work" || fail "no working directory"
export PYTHONPATH=$tmp/site PYTHONNOUSERSITE=1

has_extension=$(
  "$python" - "$wheel" <<'PY'
import sys
import zipfile

print(int(any(name.startswith("mae_fast/_C.") for name in zipfile.ZipFile(sys.argv[1]).namelist())))
PY
) || fail "cannot read the wheel $wheel"
"$python" - "$tmp/site" "$repo" "$has_extension" <<'PY' || fail "the installed package is incomplete or not the one imported"
import importlib
import sys
from pathlib import Path

site, repo, has_extension = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
roots = {"mae_fast": repo / "mae_fast", "mae_fast.kernels": repo / "kernels"}
names, missing = [], []
for package, root in roots.items():
    installed = site.joinpath(*package.split("."))
    for path in sorted(root.rglob("*.py")):
        target = installed.relative_to(site) / path.relative_to(root)
        if not (site / target).is_file():
            source = path.relative_to(repo)
            missing.append(str(source) if source == target else f"{source} (as {target})")
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] != "__main__":  # importing __main__ runs the command line
            names.append(".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)]))
for data in sorted((repo / "mae_fast" / "data").iterdir()):
    if not (site / "mae_fast" / "data" / data.name).is_file():
        missing.append(str(data.relative_to(repo)))
if missing:
    sys.exit("not in the wheel (see setup.py's packages and package data):\n  " + "\n  ".join(missing))
if has_extension:
    names.append("mae_fast._C")
problems = []
for name in names:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - every failure is reported
        problems.append(f"{name}: not importable from the install ({type(error).__name__}: {error})")
        continue
    if not Path(module.__file__).resolve().is_relative_to(site.resolve()):
        problems.append(f"{name}: imported from {module.__file__}, not from the install in {site}")
strays = [m for m, mod in sys.modules.items() if m.startswith("mae_fast") and getattr(mod, "__file__", None)
          and not Path(mod.__file__).resolve().is_relative_to(site.resolve())]
problems += [f"{m}: loaded from {sys.modules[m].__file__}" for m in strays]
if problems:
    sys.exit("\n".join(problems))
print(f"check_install: {len(names)} modules imported from the install"
      + (", mae_fast._C among them" if has_extension else " (the wheel has no mae_fast._C)"))
PY

# expect STATUS DESCRIPTION COMMAND...: run COMMAND; its exit status must be STATUS
expect() {
  local status=$1 what=$2
  shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local got=$?
  if [ "$got" -ne "$status" ]; then
    cat "$tmp/out" "$tmp/err" >&2
    fail "$what exited with $got, expected $status"
  fi
}

expect 0 "python -m mae_fast info" "$python" -m mae_fast info
if [ "$has_extension" = 1 ]; then
  grep -q "mae_fast._C loaded" "$tmp/out" || fail "mae-fast info does not report mae_fast._C as loaded: $(cat "$tmp/out")"
fi
for verb in pretrain finetune eval visualize; do
  expect 0 "python -m mae_fast $verb --help" "$python" -m mae_fast "$verb" --help
  grep -q "usage: mae-fast $verb" "$tmp/out" || fail "mae-fast $verb --help printed no usage of $verb"
done
expect 2 "python -m mae_fast bench" "$python" -m mae_fast bench
grep -q "needs a source checkout" "$tmp/err" || fail "mae-fast bench did not say it needs a source checkout"

script=$tmp/site/bin/mae-fast
[ -f "$script" ] || fail "the wheel installed no mae-fast console script"
expect 0 "mae-fast --help (the console script as is, with its #! line)" "$script" --help
expect 0 "mae-fast --help (console script)" "$python" "$script" --help
for verb in info bench pretrain finetune visualize eval; do
  grep -q "$verb" "$tmp/out" || fail "mae-fast --help does not list $verb"
done
expect 0 "mae-fast eval --help (console script)" "$python" "$script" eval --help
expect 2 "mae-fast bench (console script)" "$python" "$script" bench
grep -q "needs a source checkout" "$tmp/err" || fail "mae-fast bench (console script) did not say it needs a checkout"

say "ok: a regular install works outside the checkout ($((SECONDS - start)) s)"
