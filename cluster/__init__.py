"""The distributed shell: Ray actors and pools, Ray Train + DeepSpeed, MLflow, cluster configs."""
import os

# Ray decides at import whether a local node may advertise an external interface: keep every
# node started from this package on loopback unless the user says otherwise.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
