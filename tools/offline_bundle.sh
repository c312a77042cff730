#!/usr/bin/env bash
# An offline install bundle for a GPU node that reaches no package index: the wheels of what raypets needs there and
# the node lacks (Ray and the packages Ray needs, raypets' own wheel), for the node's Python, with Ray's Java jar
# (ray/jars/, 32 MB of the 79 MB Ray 2.60 wheel; raypets runs no Java workers) and the dashboard's source maps
# (*.map, 1.5 MB, read only by a browser's developer tools) taken out of the Ray wheel.
#
#   tools/offline_bundle.sh DIR [--python 3.12] [--present "torch==2.11.0 numpy pandas ..."] [--present-file FILE]
#                               [--glibc 2.28] [--limit-mib 64]
#
# DIR (absent or empty) gets the wheels, MANIFEST.txt (wheels, sizes, what the node is taken to have) and install.sh
# (`pip install --no-index --find-links DIR raypets`, on the node). Fails, saying so, when the bundle is not under
# --limit-mib (default 64 MiB).
#
# What the node already has (--present, else the lines of --present-file, default tools/node_packages.txt) is never
# downloaded: pip resolves against a throwaway venv of the target Python that holds a placeholder dist-info for each
# present package (NAME==VERSION at that version; a NAME alone at the version a first pass of the resolver picked for
# it), so it treats them as installed and pulls neither them nor their own dependencies; those versions are also
# constraints, so the bundled packages are picked to suit them. That pip runs under the
# target Python (pythonX.Y on PATH or under pyenv, or TARGET_PYTHON), so environment markers are the node's, and
# --python-version, --platform and --only-binary=:all: make it pick the node's wheels. At the end the same stand-in
# installs raypets from DIR alone (pip --dry-run --no-index): the bundle is complete for it.
#
# PYTHON (default: the checkout's .venv/bin/python, else python3) is the Python whose pip (>= 23.3; its config, index
# and cache) resolves and downloads. KEEP_WORK=1 keeps the work folder (pip's reports and the stand-in venv).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "offline_bundle: $*" >&2; exit 1; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir="" pyver=3.12 present="" present_file="$root/tools/node_packages.txt" glibc=2.28 limit_mib=64
while (($#)); do
    case "$1" in
        --python) pyver=${2:?--python needs a version}; shift 2 ;;
        --present) present=${2?--present needs a list}; present_file=""; shift 2 ;;
        --present-file) present_file=${2:?--present-file needs a file}; present=""; shift 2 ;;
        --glibc) glibc=${2:?--glibc needs a version such as 2.28}; shift 2 ;;
        --limit-mib) limit_mib=${2:?--limit-mib needs a number}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$dir" ]] || die "one DIR only (got $dir and $1)"; dir=$1; shift ;;
    esac
done
[[ -n "$dir" ]] || { usage >&2; exit 2; }
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "--python wants MAJOR.MINOR such as 3.12, not $pyver"
[[ "$glibc" =~ ^2\.[0-9]+$ ]] || die "--glibc wants 2.N such as 2.28, not $glibc"
[[ "$limit_mib" =~ ^[0-9]+$ ]] || die "--limit-mib wants a whole number, not $limit_mib"
if [[ -n "$present_file" ]]; then
    [[ -f "$present_file" ]] || die "no present-package list at $present_file"
    # Also `pip list --format=freeze` / `pip freeze` output: "NAME @ URL" counts as NAME, "-e ..." lines are skipped.
    present=$(sed -e '/^[[:space:]]*-/d' -e 's/[[:space:]]*@.*//' -e 's/#.*//' "$present_file" | tr -s ' \t\n' ' ')
fi
read -r -a present_specs <<<"$present"
pinned=() loose=()
for spec in "${present_specs[@]}"; do
    [[ "$spec" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+!_-]+)?$ ]] || die "present package '$spec': want NAME or NAME==VERSION"
    if [[ "$spec" == *==* ]]; then pinned+=("$spec"); else loose+=("$spec"); fi
done
[[ " ${pinned[*]} " == *" torch=="* ]] ||
    die "the present list must name torch==VERSION (the node's): torch and the CUDA wheels it needs are gigabytes" \
        "that the resolver must not even read"
if [[ -e "$dir" && -n "$(ls -A "$dir")" ]]; then die "$dir exists and is not empty: remove it or name another"; fi

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PY=$root/.venv/bin/python; else PY=python3; fi
fi
"$PY" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (23, 3))' 2>/dev/null ||
    die "$PY has no pip >= 23.3 (for install --dry-run --report with --python-version and --platform): set PYTHON"
pipdir=$("$PY" -c 'import os, pip; print(os.path.dirname(pip.__file__))')

tpy=${TARGET_PYTHON:-}
if [[ -z "$tpy" ]]; then
    for cand in "python$pyver" "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$pyver"*/bin/"python$pyver"; do
        if "$cand" -c "import sys; sys.exit(sys.version_info[:2] != (${pyver/./, }))" 2>/dev/null; then
            tpy=$cand
            break
        fi
    done
fi
if [[ -z "$tpy" ]]; then
    tpy=$PY
    echo "offline_bundle: WARNING: no Python $pyver here (set TARGET_PYTHON): resolving under $("$PY" -V 2>&1)," \
         "so environment markers are evaluated for that version; the bundle may lack a package only $pyver needs" >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/offline_bundle.XXXXXX")
trap '[[ -n "${KEEP_WORK:-}" ]] || rm -rf "$work"' EXIT
run_logged() {  # run a command with its output in a log, shown only when it fails
    if ! "$@" >"$work/log" 2>&1; then cat "$work/log" >&2; die "failed: $*"; fi
}

# pip's target options: CPython $pyver wheels for manylinux up to glibc $glibc (pip matches each tag exactly).
target=(--only-binary=:all: --python-version "$pyver" --implementation cp)
for ((minor = ${glibc#2.}; minor >= 5; minor--)); do target+=(--platform "manylinux_2_${minor}_x86_64"); done
target+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

# 1. raypets' own wheel, from a copy of the checkout's tracked and untracked-but-not-ignored files.
echo "offline_bundle: building the raypets wheel" >&2
mkdir -p "$work/src" "$work/own"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$work/src"
else
    tar -C "$root" --exclude=.venv --exclude=.git -cf - . | tar -xf - -C "$work/src"
fi
run_logged "$PY" -m pip wheel --no-deps -w "$work/own" "$work/src"
own=$(ls "$work"/own/raypets-*.whl)
raypets_version=$(basename "$own" | cut -d- -f2)

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# 2. The stand-in node: a venv of the target Python without pip, holding the placeholders; the pip that runs in it
#    comes from PYTHONPATH (a folder with pip alone), so nothing else of this machine looks installed.
run_logged "$tpy" -m venv --without-pip "$work/node"
node_site=$("$work/node/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
mkdir -p "$work/piponly"
ln -s "$pipdir" "$work/piponly/pip"
node_env=()  # changes to the environment of the pip that node_pip runs (env's arguments)
node_pip() {
    env "${node_env[@]}" PYTHONPATH="$work/piponly" PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$work/node/bin/python" -m pip "$@"
}

placeholders() {  # placeholders NAME==VERSION...: an installed-looking dist-info, without dependencies, for each
    "$PY" - "$node_site" "$@" <<'EOF'
import os
import re
import sys

site = sys.argv[1]
for spec in sys.argv[2:]:
    name, version = spec.split("==")
    folder = os.path.join(site, f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    with open(os.path.join(folder, "INSTALLER"), "w") as f:
        f.write("offline_bundle placeholder\n")
    open(os.path.join(folder, "RECORD"), "w").close()
EOF
}
((${#pinned[@]} == 0)) || placeholders "${pinned[@]}"
# The placeholders' versions are also constraints: the node's packages stay as they are, and the resolver picks
# versions of the bundled packages that suit them (or says why none does).
printf '%s\n' "${pinned[@]}" >"$work/constraints.txt"

echo "offline_bundle: resolving raypets for CPython $pyver, manylinux glibc <= $glibc" \
     "(${#present_specs[@]} packages taken as present)" >&2
run_logged node_pip install --dry-run --quiet --report "$work/report1.json" -c "$work/constraints.txt" \
    "${target[@]}" "$own"
# A present NAME alone that the resolution reached gets a placeholder at the version picked for it; then resolve
# again, so that neither it nor what only it needs is downloaded.
"$PY" - "$work/report1.json" "${loose[@]}" >"$work/picked.txt" <<'EOF'
import json
import re
import sys

loose = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2:]}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if re.sub(r"[-_.]+", "-", name).lower() in loose:
        print(f"{name}=={version}")
EOF
mapfile -t picked <"$work/picked.txt"
if ((${#picked[@]})); then
    placeholders "${picked[@]}"
    printf '%s\n' "${picked[@]}" >>"$work/constraints.txt"
    run_logged node_pip install --dry-run --quiet --report "$work/report.json" -c "$work/constraints.txt" \
        "${target[@]}" "$own"
else
    cp "$work/report1.json" "$work/report.json"
fi

# 3. Download what is left: the very files the resolver chose (hash-checked).
"$PY" - "$work/report.json" "${present_specs[@]}" >"$work/urls.txt" <<'EOF'
import json
import re
import sys

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
present = {norm(s.split("==")[0]) for s in sys.argv[2:]}
clash, huge = [], []
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    if name == "raypets":
        continue
    if name in present:
        clash.append(f"{name}=={version}")
    elif name in ("torch", "torchvision", "triton") or name.startswith("nvidia-"):
        huge.append(name)
    info = item["download_info"]
    sha = info.get("archive_info", {}).get("hashes", {}).get("sha256")
    print(info["url"].split("#")[0] + (f"#sha256={sha}" if sha else ""))
if clash:
    sys.exit("offline_bundle: the resolver wants other versions of these present packages than the node is taken to "
             "have: " + ", ".join(clash) + " (fix the version in the present list, or drop the line to carry it)")
if huge:
    sys.exit("offline_bundle: the node must already have " + ", ".join(huge) + " (gigabytes of wheels, never carried):"
             " name them in the present list")
EOF
mapfile -t urls <"$work/urls.txt"
echo "offline_bundle: downloading ${#urls[@]} wheels" >&2
((${#urls[@]} == 0)) || run_logged "$PY" -m pip download --no-deps --quiet -d "$dir" "${target[@]}" "${urls[@]}"
cp "$own" "$dir/"

# 4. Ray without ray/jars/ (with no jars folder Ray starts no Java workers, as a build without Java) and the
#    dashboard's *.map files: their entries and RECORD rows go, the other entries are copied still compressed.
for whl in "$dir"/ray-*.whl; do
    [[ -e "$whl" ]] || continue
    "$PY" - "$whl" <<'EOF'
import csv
import io
import os
import sys
import zipfile


def dropped(name):
    return name.startswith("ray/jars/") or (name.startswith("ray/dashboard/client/build/") and name.endswith(".map"))


path = sys.argv[1]
tmp = path + ".partial"
with zipfile.ZipFile(path) as zin:
    infos = zin.infolist()
    gone = [i for i in infos if dropped(i.filename)]
    if not any(i.filename.startswith("ray/jars/") for i in gone):
        print(f"offline_bundle: NOTE: {os.path.basename(path)} has no ray/jars/", file=sys.stderr)
    record = next(i.filename for i in infos if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/RECORD"))
    rows = [r for r in csv.reader(io.StringIO(zin.read(record).decode())) if r and not dropped(r[0])]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(tmp, "w") as zout:
        for info in infos:
            if dropped(info.filename) or info.filename == record:
                continue
            # zipfile has no public raw copy: read the member's compressed bytes after its local header, write a
            # local header of our own before them, and register the entry for the central directory.
            zin.fp.seek(info.header_offset)
            header = zin.fp.read(30)
            if header[:4] != b"PK\x03\x04":
                sys.exit(f"offline_bundle: {path}: no local header for {info.filename}")
            zin.fp.seek(info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                        + int.from_bytes(header[28:30], "little"))
            raw = zin.fp.read(info.compress_size)
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.compress_type, copy.external_attr, copy.create_system = (
                info.compress_type, info.external_attr, info.create_system)
            copy.CRC, copy.compress_size, copy.file_size = info.CRC, info.compress_size, info.file_size
            copy.header_offset = zout.fp.tell()
            zout.fp.write(copy.FileHeader())
            zout.fp.write(raw)
            zout.filelist.append(copy)
            zout.NameToInfo[copy.filename] = copy
            zout.start_dir = zout.fp.tell()
        zout.writestr(zipfile.ZipInfo(record, infos[-1].date_time), out.getvalue(), zipfile.ZIP_DEFLATED)
with zipfile.ZipFile(tmp) as check:  # every member's CRC, and the names
    bad = check.testzip()
    if bad or len(check.infolist()) != len(infos) - len(gone):
        sys.exit(f"offline_bundle: the rewritten {path} is damaged (at {bad})")
os.replace(tmp, path)
print(f"offline_bundle: {os.path.basename(path)}: took out {len(gone)} entries"
      f" ({sum(i.compress_size for i in gone) / 1e6:.1f} MB compressed: " + ", ".join(i.filename for i in gone)
      + ") and their RECORD rows", file=sys.stderr)
EOF
done

# 5. The check: the stand-in node installs raypets from DIR alone, and needs every wheel there. pip's configuration
#    is left out (a find-links or index of this machine would hide a wheel missing here).
mapfile -t pip_vars < <(compgen -e | grep '^PIP_' || true)
node_env=("${pip_vars[@]/#/-u}" PIP_CONFIG_FILE=/dev/null)
run_logged node_pip install --dry-run --quiet --no-index --find-links "$dir" --report "$work/check.json" \
    "${target[@]}" "raypets==$raypets_version"
"$PY" - "$dir" "$work/check.json" <<'EOF'
import json
import os
import re
import sys

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
wheels = {norm(f.split("-")[0]) for f in os.listdir(sys.argv[1]) if f.endswith(".whl")}
used = {norm(i["metadata"]["name"]) for i in json.load(open(sys.argv[2]))["install"]}
if used != wheels:
    sys.exit(f"offline_bundle: installing from the bundle alone uses {sorted(used - wheels)} not in it and leaves "
             f"{sorted(wheels - used)} unused")
EOF

# 6. install.sh, MANIFEST.txt, and the size check (install.sh goes again if the bundle is too big).
cat >"$dir/install.sh" <<EOF
#!/bin/sh
# Installs raypets $raypets_version and what it needs from this folder alone, with no package index, into the Python
# given as PYTHON (default python3; on the GPU node, the one that has torch). Built for CPython $pyver.
# Extra arguments go to pip (--dry-run to try first, --user, ...).
set -e
here=\$(cd "\$(dirname "\$0")" && pwd)
py=\${PYTHON:-python3}
"\$py" -m pip install --no-index --find-links "\$here" "\$@" "raypets==$raypets_version"
case " \$* " in *" --dry-run "*) exit 0 ;; esac
"\$py" -c "import ray, raypets; print('installed: ray', ray.__version__, '; raypets at', raypets.__file__)"
EOF
chmod +x "$dir/install.sh"

"$PY" - "$dir" "$work/report.json" "$limit_mib" "$pyver" "$glibc" "$work/picked.txt" "${pinned[@]}" <<'EOF'
import json
import os
import re
import sys

from pip._vendor.packaging.requirements import Requirement

folder, report, limit_mib, pyver, glibc, picked_file = sys.argv[1:7]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
present = {norm(s.split("==")[0]): (s, "given") for s in sys.argv[7:]}
present.update({norm(s.split("==")[0]): (s, "picked by the resolver") for s in open(picked_file).read().split()})
wheels = sorted((f for f in os.listdir(folder) if f.endswith(".whl")), key=lambda f: -os.path.getsize(f"{folder}/{f}"))
sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in wheels}

# What each installed package asks of each present one (markers for the target, extras as requested along the way).
data = json.load(open(report))
env, items = data["environment"], {norm(i["metadata"]["name"]): i["metadata"] for i in data["install"]}
extras = {n: set() for n in items}
asked = {}
changed = True
while changed:
    changed = False
    for name, meta in items.items():
        for text in meta.get("requires_dist", []):
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras[name] | {""}):
                continue
            dep = norm(req.name)
            asked.setdefault(dep, set()).add(f"{req.specifier or 'any'} (by {meta['name']})")
            if dep in extras and not set(req.extras) <= extras[dep]:
                extras[dep] |= set(req.extras)
                changed = True

head = [
    f"raypets offline bundle for CPython {pyver}, Linux x86_64 (manylinux, glibc <= {glibc}).",
    "On the node: sh install.sh  (python3 -m pip install --no-index --find-links THIS_FOLDER raypets; PYTHON=... for"
    " another Python)",
]
body = ["", f"{'bytes':>12} {'MiB':>7}  wheel"]
for f in wheels:
    note = "  (ray/jars/ and the dashboard's *.map taken out)" if f.startswith("ray-") else ""
    note += f"  (extras: {','.join(sorted(extras[norm(f.split('-')[0])]))})" if extras.get(norm(f.split("-")[0])) else ""
    body.append(f"{sizes[f]:>12} {sizes[f] / 2**20:>7.2f}  {f}{note}")
body += ["", "Taken as present on the node, with no wheel here (the node's version must satisfy what is asked):"]
for name in sorted(set(asked) & set(present)):
    spec, how = present[name]
    body.append(f"  {spec}  [{how}]: " + "; ".join(sorted(asked[name])))
manifest = os.path.join(folder, "MANIFEST.txt")
others = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f != "MANIFEST.txt")
total = others
for _ in range(5):  # the total counts this file too: settle its own length
    text = "\n".join(head + [f"Total: {total} bytes ({total / 2**20:.2f} MiB): {len(wheels)} wheels, install.sh and"
                             " this file"] + body) + "\n"
    if others + len(text.encode()) == total:
        break
    total = others + len(text.encode())
with open(manifest, "w") as f:
    f.write(text)
total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
print(f"offline_bundle: {folder}: {len(wheels)} wheels, {total / 2**20:.2f} MiB ({total} bytes); see MANIFEST.txt",
      file=sys.stderr)
if total >= int(limit_mib) * 2**20:
    os.remove(os.path.join(folder, "install.sh"))
    biggest = ", ".join(f"{f.split('-')[0]} {sizes[f] / 2**20:.1f}" for f in wheels[:6])
    sys.exit(f"offline_bundle: the bundle is {total / 2**20:.2f} MiB, not under the {limit_mib} MiB limit "
             f"(largest, MiB: {biggest}). It is left in {folder} to look at, without install.sh")
EOF
