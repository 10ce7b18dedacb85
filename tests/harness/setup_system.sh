#!/usr/bin/env bash
# Installs the Debian packages the test suite uses, when we are root. Not root: print what
# is missing; the tests that need it skip with a readable reason.
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
# The throw-away SLURM cluster of the orchestration tests (slurm/cluster.sh).
# strace: the offline-wandb test checks that a training run opens no connection off the machine.
for pkg in slurmctld slurmd slurm-client munge strace; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-system: not root, not installing: ${need[*]} (tests that need them will skip)"
  exit 0
fi
echo "setup-system: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
