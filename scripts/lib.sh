# Shell helpers the check scripts and CI share: `. scripts/lib.sh`.

# apt_install PACKAGE...: installs with apt-get, refreshing the package lists once where that
# fails; waits for apt's lock (CI runs check scripts that install side by side).
apt_install() {
  local apt=(apt-get -o DPkg::Lock::Timeout=600)
  "${apt[@]}" install -y -q "$@" >/dev/null ||
    { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q "$@" >/dev/null; }
}

# copy_tracked REPO DEST: the files git tracks in REPO, as they are in its working tree, into DEST.
copy_tracked() {
  mkdir -p "$2"
  git -C "$1" ls-files -z | tar -C "$1" --null -T - -cf - | tar -C "$2" -xf -
}
