"""The web console's fleet view against the fleet tier's real etcd and daemons: started with
the operator's fleet credentials, it lists every host with its agents and their states, read
from the store. Needs root, runc, etcd, chromium and chromedriver."""

from __future__ import annotations

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

from tests.fleet.support import PREFIX, Fleet
from tests.support.browser import chromium
from tests.support.console import console, shot
from tests.support.daemon import wait_for


def test_the_console_shows_the_fleet(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    host.daemon.agentctl("run", "--detach", "--name", "fleet-seen", "--class", "shown", "--",
                         "sleep", "600", check=True)
    secret = fleet.root / "console-operator.password"
    secret.write_text(fleet.operator_password)
    secret.chmod(0o600)
    env = {"AGENT_SUPERVISOR_FLEET_ENDPOINTS": fleet.endpoint,
           "AGENT_SUPERVISOR_FLEET_CA": str(fleet.pki.ca_file),
           "AGENT_SUPERVISOR_FLEET_CERT": str(fleet.operator_cert[0]),
           "AGENT_SUPERVISOR_FLEET_KEY": str(fleet.operator_cert[1]),
           "AGENT_SUPERVISOR_FLEET_USER": "operator",
           "AGENT_SUPERVISOR_FLEET_PASSWORD_FILE": str(secret),
           "AGENT_SUPERVISOR_FLEET_PREFIX": PREFIX}
    try:
        with console(host.daemon, None, env_extra=env) as running, chromium() as page:
            page.get(running.url)
            wait_for(lambda: page.find_element(By.ID, "tab-fleet").is_displayed(), 30,
                     what="the fleet tab")
            page.find_element(By.ID, "tab-fleet").click()

            def hosts_shown() -> bool:
                rows = page.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")
                return len(rows) >= len(fleet.hosts) and all(
                    page.find_elements(By.ID, f"host-{h.host_id}") for h in fleet.hosts)

            wait_for(hosts_shown, 60, what="every host in the fleet view")

            def agent_state() -> str:
                found = page.find_elements(
                    By.CSS_SELECTOR, f"#host-{host.host_id} [data-agent=fleet-seen] .badge")
                try:
                    return found[0].text.lower() if found else ""
                except StaleElementReferenceException:
                    return ""

            wait_for(lambda: agent_state() == "active", 60, what="the agent on its host")
            alive = page.find_element(By.CSS_SELECTOR, f"#host-{host.host_id} .badge")
            assert alive.text.lower() == "alive"
            assert not page.find_element(By.ID, "fleet-error").is_displayed()
            shot(page, "fleet")
    finally:
        host.daemon.agentctl("kill", "fleet-seen", "--reason", "test done")
