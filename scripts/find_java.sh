#!/usr/bin/env bash
# Print a JAVA_HOME that Spark 4 accepts (Java 17 or 21), installing one with apt when
# none is present and we are root; otherwise stop with a one-line instruction.
set -u
accepts() {  # $1: a java binary; true when its major version is 17 or 21
  local major
  major=$("$1" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}')
  [ "$major" = 17 ] || [ "$major" = 21 ]
}
candidates() {
  [ -n "${JAVA_HOME:-}" ] && echo "$JAVA_HOME/bin/java"
  command -v java 2>/dev/null && readlink -f "$(command -v java)"
  ls -d /usr/lib/jvm/*/bin/java 2>/dev/null
}
find_home() {
  local bin
  for bin in $(candidates); do
    if [ -x "$bin" ] && accepts "$bin"; then
      dirname "$(dirname "$(readlink -f "$bin")")"
      return 0
    fi
  done
  return 1
}
if find_home; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing openjdk-17-jre-headless for Spark..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless) >&2 \
    && find_home && exit 0
fi
echo "Spark 4 needs Java 17 or 21: install one (e.g. 'apt-get install openjdk-17-jre-headless') or set JAVA_HOME." >&2
exit 1
