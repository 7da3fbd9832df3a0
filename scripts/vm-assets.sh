#!/usr/bin/env bash
# Fetches what the `vm` isolation backend needs on a Debian host, into DIR:
#
#   DIR/vmlinuz        Debian's cloud kernel (not installed into /boot)
#   DIR/modules/*.ko   the kernel modules the guest must load itself
#                      (virtio-mmio, virtio-blk, virtio-net, ext4 and their
#                      dependencies, whichever of them are not built in),
#                      uncompressed unless the kernel can decompress them
#   DIR/modules.order  their file names, one a line, in load order
#   DIR/VERSION        the kernel's release string (uname -r in the guest)
#
# and installs qemu-system-x86 and qemu-utils (qemu-img) when missing.
# Idempotent: run it again and it refreshes DIR to the kernel that
# linux-image-cloud-amd64 currently depends on.
#
# Usage: scripts/vm-assets.sh DIR      (as root, or with sudo for apt-get)
set -euo pipefail

die() { echo "vm-assets: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
dir=$1
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

apt_updated=
apt_update() {
  [ -n "$apt_updated" ] && return 0
  $SUDO apt-get update -qq
  apt_updated=1
}

# 1. QEMU.
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "vm-assets: installing ${missing[*]}"
  apt_update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. Which concrete cloud kernel package the meta package points at.
concrete() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
pkg=$(concrete)
if [ -z "$pkg" ]; then
  apt_update
  pkg=$(concrete)
fi
[ -n "$pkg" ] || die "apt knows no linux-image-cloud-amd64; is a Debian main archive in sources.list?"

# Already there (same kernel, every listed module present): nothing to do.
if [ -f "$dir/vmlinuz" ] && [ -f "$dir/modules.order" ] &&
  [ "$(cat "$dir/VERSION" 2>/dev/null)" = "${pkg#linux-image-}" ]; then
  complete=1
  while IFS= read -r m; do
    [ -z "$m" ] || [ -f "$dir/modules/$m" ] || complete=
  done <"$dir/modules.order"
  if [ -n "$complete" ]; then
    echo "vm-assets: kernel ${pkg#linux-image-} already in $dir (vmlinuz, modules/, modules.order, VERSION)"
    echo "vm-assets: qemu: $(command -v qemu-system-x86_64), qemu-img: $(command -v qemu-img)"
    exit 0
  fi
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vm-assets.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "vm-assets: fetching $pkg"
if ! (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1); then
  apt_update
  (cd "$work" && apt-get download -q "$pkg" >/dev/null) || die "apt-get download $pkg failed"
fi
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/x"

vmlinuz=$(ls "$work"/x/boot/vmlinuz-* | head -n1)
version=${vmlinuz##*/vmlinuz-}
config="$work/x/boot/config-$version"
moddir="$work/x/lib/modules/$version"
[ -f "$config" ] || die "no config-$version in $pkg"
[ -d "$moddir" ] || die "no lib/modules/$version in $pkg"

# 3. Which of the needed features are modules. "=y": built in, nothing to
# load; "=m": a module, loaded with its dependencies first.
wanted=(VIRTIO_MMIO:virtio_mmio VIRTIO_BLK:virtio_blk VIRTIO_NET:virtio_net EXT4_FS:ext4)
roots=()
for w in "${wanted[@]}"; do
  opt=${w%%:*} mod=${w##*:}
  state=$(sed -n "s/^CONFIG_$opt=\(.\)$/\1/p" "$config")
  case "$state" in
    y) echo "vm-assets: CONFIG_$opt=y (built in)" ;;
    m) echo "vm-assets: CONFIG_$opt=m (module $mod)"; roots+=("$mod") ;;
    *) die "CONFIG_$opt is not set in $version: the guest cannot use it" ;;
  esac
done
decompress=$(grep -c '^CONFIG_MODULE_DECOMPRESS=y' "$config" || true)

# Dependencies come from each module's own .modinfo ("depends=a,b"), not
# from modules.dep: the package does not ship that file (depmod makes it at
# install time) and depmod (kmod) need not be on the host.
catmod() { # a module's bytes, whatever its compression
  case "$1" in
    *.xz) xz -dc "$1" ;;
    *.zst) zstd -qdc "$1" ;;
    *.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
  esac
}
norm() { local n=${1##*/}; n=${n%%.ko*}; echo "${n//-/_}"; }
declare -A modpath=()
while IFS= read -r -d '' f; do
  modpath[$(norm "$f")]=$f
done < <(find "$moddir/kernel" -name '*.ko*' -print0)
deps_of() { # direct dependencies (module names) of a module file
  catmod "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' '\n' | sed '/^$/d'
}

# Depth-first post-order: dependencies before the module that needs them.
order=()
seen=" "
visit() {
  local p=$1 d
  case "$seen" in *" $p "*) return ;; esac
  seen="$seen$p "
  for d in $(deps_of "$p"); do
    d=$(norm "$d")
    [ -n "${modpath[$d]:-}" ] || die "module $(norm "$p") needs $d, which $version does not ship"
    visit "${modpath[$d]}"
  done
  order+=("$p")
}
for m in ${roots[@]+"${roots[@]}"}; do
  p=${modpath[$m]:-}
  [ -n "$p" ] || die "module $m is not in $version"
  visit "$p"
done

# 4. Install into DIR (replacing what an earlier run left).
rm -rf "$dir/modules" "$dir/modules.order.tmp"
mkdir -p "$dir/modules"
: >"$dir/modules.order.tmp"
for p in ${order[@]+"${order[@]}"}; do
  src=$p
  base=${p##*/}
  case "$base" in
    *.ko.xz|*.ko.zst|*.ko.gz)
      if [ "$decompress" -ge 1 ]; then
        # finit_module(MODULE_INIT_COMPRESSED_FILE) decompresses in the kernel.
        cp "$src" "$dir/modules/$base"
      else
        out=${base%.*}
        case "$base" in
          *.xz) xz -dc "$src" >"$dir/modules/$out" ;;
          *.zst) zstd -qdc "$src" >"$dir/modules/$out" ;;
          *.gz) gzip -dc "$src" >"$dir/modules/$out" ;;
        esac
        base=$out
      fi
      ;;
    *) cp "$src" "$dir/modules/$base" ;;
  esac
  echo "$base" >>"$dir/modules.order.tmp"
done
mv "$dir/modules.order.tmp" "$dir/modules.order"
cp "$vmlinuz" "$dir/vmlinuz.tmp" && mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
echo "$version" >"$dir/VERSION"

echo "vm-assets: kernel $version -> $dir/vmlinuz"
echo "vm-assets: $(wc -l <"$dir/modules.order") modules -> $dir/modules/ (load order in $dir/modules.order):"
sed 's/^/vm-assets:   /' "$dir/modules.order"
if [ "$decompress" -ge 1 ]; then
  echo "vm-assets: the kernel has CONFIG_MODULE_DECOMPRESS: compressed modules kept as they are"
fi
echo "vm-assets: qemu: $(command -v qemu-system-x86_64), qemu-img: $(command -v qemu-img)"
