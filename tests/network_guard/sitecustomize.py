# Python runs this at the start of every subprocess the tests start (tests/conftest.py puts this
# folder on PYTHONPATH): outbound network connections refused and recorded (runner_network_guard.py).
import os

if os.environ.get("RUNNER_TEST_NETWORK_LOG"):
    import runner_network_guard

    runner_network_guard.install_for_process(os.environ["RUNNER_TEST_NETWORK_LOG"])
