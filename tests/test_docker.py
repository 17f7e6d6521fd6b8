"""docker/: no engine here, so check what can be checked: the compose file parses, every
file and command it and the Dockerfile refer to exists, and the pins match setup.cfg."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def test_compose_file_parses_and_has_the_services():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"minio", "spark-master", "spark-worker", "job"} <= set(services)
    build = services["spark-master"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert services["job"]["restart"] == "no"
    assert services["job"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("spark-worker", "job"):
        assert services[name]["image"] == services["spark-master"]["image"]


def test_every_file_the_image_and_commands_use_exists():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for service in compose["services"].values():
        for part in service.get("command", []) if isinstance(service.get("command"), list) else []:
            if part.startswith("/app/"):
                assert (REPO / part[len("/app/"):]).exists(), part
    script = (DOCKER / "run_demo.sh").read_text()
    for path in re.findall(r"/app/(\S+\.(?:py|sh))", script):
        assert (REPO / path).exists(), path
    assert subprocess.run(["bash", "-n", str(DOCKER / "run_demo.sh")]).returncode == 0
    assert subprocess.run(["make", "-n", "docker-demo"], cwd=REPO, capture_output=True).returncode == 0


def test_image_pins_satisfy_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    required = [Requirement(line.strip()) for line in parser["options"]["install_requires"].splitlines()
                if line.strip() and not line.strip().startswith("#")]
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    for requirement in required:
        if requirement.name == "pyspark":
            continue  # provided by the image's Spark distribution
        assert requirement.name.lower() in pins, requirement.name
        assert requirement.specifier.contains(pins[requirement.name.lower()]), (requirement, pins[requirement.name.lower()])
