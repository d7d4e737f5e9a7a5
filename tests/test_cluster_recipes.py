"""The cluster recipes of docs/scaling.md (examples/cluster/) parse, and the cfdist command each one
runs is a valid pretraining command line (every override a known config key); the cloud recipes keep
shards and runs on object storage and hold no credentials."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from paths import ROOT

RECIPES = ROOT / "examples" / "cluster"


def check_pretrain_command(command: str, object_storage: bool = False) -> None:
    from cfdist import storage
    from cfdist.train.config import load_pretrain_config
    from cfdist.train.driver import parse_args

    words = shlex.split(command)
    args = parse_args(words[words.index("pretrain") + 1:])
    cfg = load_pretrain_config(args.config, args.overrides)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 2
    if object_storage:
        assert storage.is_uri(cfg.data.shards) and storage.is_uri(cfg.output_dir), command
        assert cfg.scaling.max_failures >= 1  # a worker lost with its node resumes from the bucket


def no_credentials(text: str) -> None:
    """A recipe names credential variables but never holds a value for a secret."""
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S", text), "a secret in a recipe"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an access key id in a recipe"


def test_vm_cluster_launcher_config_parses():
    cfg = yaml.safe_load((RECIPES / "ray-cluster-aws.yaml").read_text())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["max_workers"] >= max(t.get("max_workers", 0) for t in cfg["available_node_types"].values())
    assert any("pip install" in c for c in cfg["setup_commands"])
    text = (RECIPES / "ray-cluster-aws.yaml").read_text()
    no_credentials(text)
    # the jobs it documents use the bucket, reached through the nodes' instance profile
    command = re.search(r"#\s+cfdist pretrain(?:.*\\\n)*.*", text).group(0)
    check_pretrain_command(re.sub(r"\\\n#?", " ", command).lstrip("# "), object_storage=True)
    assert all("IamInstanceProfile" in t["node_config"] for t in cfg["available_node_types"].values())


def test_kuberay_rayjob_parses_and_runs_a_valid_pretraining_command():
    job = yaml.safe_load((RECIPES / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["headGroupSpec"] and spec["rayClusterSpec"]["workerGroupSpecs"]
    check_pretrain_command(spec["entrypoint"], object_storage=True)
    no_credentials((RECIPES / "kuberay-rayjob.yaml").read_text())
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + \
        [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:  # every pod gets the credentials (from a secret), not only the driver's
        container = pod["spec"]["containers"][0]
        assert any("secretRef" in ref for ref in container.get("envFrom", [])), container


def test_slurm_script_is_valid_bash_and_runs_a_valid_pretraining_command():
    script = (RECIPES / "slurm-ray.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(RECIPES / "slurm-ray.sbatch")]).returncode == 0
    assert re.search(r"^#SBATCH --nodes=\d+", script, re.M)
    line = re.search(r"cfdist pretrain(?:.*\\\n)*.*", script).group(0).replace("\\\n", " ")
    values = {"$SHARDS": "/shared/shards", "$RUNS": "/shared/runs", "$SLURM_JOB_NAME": "job",
              "$(( ${#nodes[@]} * 8 ))": "16"}
    for var, value in values.items():
        line = line.replace(var, value)
    assert "$" not in line, line
    check_pretrain_command(line)


@pytest.mark.parametrize("name", ["ray-cluster-aws.yaml", "kuberay-rayjob.yaml", "slurm-ray.sbatch"])
def test_recipes_are_linked_from_the_scaling_guide(name):
    assert f"examples/cluster/{name}" in (ROOT / "docs" / "scaling.md").read_text()
