#!/usr/bin/env bash
# Install radguard and everything it needs on a fresh Debian machine (run as root or with sudo).
#   bash scripts/install.sh          # runtime: dcmtk + radguard[all] + the OHIF Viewer
#   bash scripts/install.sh --dev    # plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# dcmtk (dcmsign, dcmconv) is the interoperability peer for DICOM signatures;
# dicom3tools' dciodvfy validates the SR and secondary-capture objects radguard writes;
# openssl serves as a local time-stamping authority in the tests.
need_apt=()
command -v dcmsign >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# Orthanc (with its DICOMweb plugin) is the real PACS the archive audit and the gateway are
# tested against; the tests start and stop their own instance.
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
compgen -G "/usr/lib/orthanc/libOrthancDicomWeb.so*" >/dev/null || need_apt+=(orthanc-dicomweb)
# headless Chromium and its driver for the web UI's browser test, and a PostgreSQL server
# for the store's second backend (--dev only; the tests start their own instances)
if [ "${1:-}" = "--dev" ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
  # npm fetches the OHIF Viewer below, which the viewer's browser test needs
  command -v npm >/dev/null 2>&1 || need_apt+=(npm)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# every extra (ai, gateway, scale, onnx: pyproject.toml), so the gateway, triage, forensics
# and archive audits all work; --dev adds the test and lint tools (and pulls [all] too)
extras="[all]"
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# pyenv installs console scripts behind shims that must be regenerated
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
python -c "import radguard; print('radguard', radguard.__version__, 'installed')"

# The OHIF Viewer the gateway serves under /viewer/ (radguard/gateway/viewer.py): its prebuilt
# dist/ from the npm registry (~50 MB packed), fetched once into .cache/ (not committed), where
# the gateway looks by default ([viewer] ohif_dist). OHIF_VERSION must match the one in
# radguard/gateway/config.py. Without npm the gateway runs, and says "viewer not installed".
OHIF_VERSION=3.13.2
ohif_dir=".cache/ohif/${OHIF_VERSION}"
if [ -f "${ohif_dir}/dist/index.html" ]; then
  echo "OHIF Viewer ${OHIF_VERSION} already in ${ohif_dir}/dist"
elif command -v npm >/dev/null 2>&1; then
  mkdir -p "${ohif_dir}"
  fetch="$(mktemp -d "${ohif_dir}/.fetch-XXXXXX")"  # same filesystem: the dist is renamed in
  if (cd "${fetch}" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null) \
      && tar -xzf "${fetch}"/ohif-app-*.tgz -C "${fetch}" package/dist \
      && [ -f "${fetch}/package/dist/index.html" ]; then
    rm -rf "${ohif_dir}/dist"
    mv "${fetch}/package/dist" "${ohif_dir}/dist"
    echo "OHIF Viewer ${OHIF_VERSION} installed in ${ohif_dir}/dist"
  else
    echo "WARNING: could not fetch the OHIF Viewer (npm pack @ohif/app@${OHIF_VERSION})" \
         "- the gateway runs without it and says 'viewer not installed'" >&2
  fi
  rm -rf "${fetch}"
else
  echo "WARNING: npm not found, so the OHIF Viewer is not installed - the gateway runs" \
       "without it and says 'viewer not installed' (apt-get install npm, then run this" \
       "script again)" >&2
fi
