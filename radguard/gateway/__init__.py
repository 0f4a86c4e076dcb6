"""Gateway: the DICOM front door with trust checks, quarantine and PACS forwarding.

::

    gateway = Gateway(load_config("radguard.toml"))
    gateway.start()          # C-STORE SCP listening, pipeline workers running
    ...
    gateway.stop()
"""

from radguard.gateway.config import ConfigError, GatewayConfig, load_config
from radguard.gateway.service import Gateway
from radguard.gateway.store import Instance, Store, StoreError

__all__ = ["ConfigError", "Gateway", "GatewayConfig", "Instance", "Store", "StoreError",
           "load_config"]
