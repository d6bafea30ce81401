"""The SMART login, consent and patient portal pages in a real browser (headless Chromium).

Selenium drives Debian's chromium through Debian's chromedriver (run.sh installs both);
SE_OFFLINE keeps Selenium Manager from fetching any driver or browser of its own.
"""
import os
import re
import secrets
import urllib.parse

import pytest

from smart_support import (
    artifacts_dir,
    authorize_url,
    exchange_code,
    fhir_get,
    pkce_pair,
    png_summary,
    unique,
    wait_for_status,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 20


def left_page(element):
    """A wait condition: `element`'s page was replaced. Selenium's `staleness_of` knows only
    StaleElementReferenceException; Chrome sometimes answers a call on a node of a page it is
    replacing with "Node with given id does not belong to the document" instead (one CI run
    failed on it right after the withdraw form was submitted): the same fact, told differently."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    def gone(_driver):
        try:
            element.is_enabled()
            return False
        except StaleElementReferenceException:
            return True
        except WebDriverException as e:
            if "does not belong to the document" in str(e):
                return True
            raise

    return gone


def extension_values(value, url, inside=False):
    """Every value[x] string of the extensions with this url, wherever they sit in a resource."""
    out = []
    if isinstance(value, dict):
        here = inside or value.get("url") == url
        for k, v in value.items():
            if here and k.startswith("value") and isinstance(v, str):
                out.append(v)
            else:
                out += extension_values(v, url, here and k == "extension")
    elif isinstance(value, list):
        for v in value:
            out += extension_values(v, url, inside)
    return out


@pytest.fixture(scope="module")
def artifacts():
    return artifacts_dir()


@pytest.fixture
def browser(request, artifacts):
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: run conformance/run.sh, which installs chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    # What the browser showed last, for whoever reads a failure.
    try:
        name = request.node.name
        driver.save_screenshot(os.path.join(artifacts, f"{name}-last.png"))
        with open(os.path.join(artifacts, f"{name}-last.html"), "w", encoding="utf-8") as f:
            f.write(driver.page_source)
    except Exception:
        pass
    driver.quit()


def test_consent_in_browser_then_withdraw_in_portal(smart_base, smart_admin, smart_config, smart_backend,
                                                    callback_server, patient_user, browser, artifacts):
    from selenium.common.exceptions import (ElementClickInterceptedException, ElementNotInteractableException,
                                            NoAlertPresentException)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    scopes = ["launch/patient", "openid", "fhirUser", "patient/Patient.rs", "patient/Observation.rs"]
    scope = " ".join(scopes)
    app_name = unique("Conformance Browser App")
    cid = smart_admin.register_client(app_name, "none", [callback_server.url], scope=scope)["client_id"]
    smart_backend.create({
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": f"Patient/{patient_user.id}"},
        "valueQuantity": {"value": 170, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}})

    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    browser.get(authorize_url(smart_config, cid, callback_server.url, scope, smart_base, challenge, state))

    # Login page.
    wait.until(EC.element_to_be_clickable((By.ID, "login-submit")))
    browser.find_element(By.CSS_SELECTOR, "form#login input[name='username']").send_keys(patient_user.username)
    browser.find_element(By.CSS_SELECTOR, "form#login input[name='password']").send_keys(patient_user.password)
    browser.find_element(By.ID, "login-submit").click()

    # Consent page: names the app, one ticked checkbox per requested scope, each with a label.
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "form#consent")))
    wait.until(EC.element_to_be_clickable((By.ID, "approve")))
    assert any(c["name"] == "fl_session" for c in browser.get_cookies()), browser.get_cookies()
    assert app_name.casefold() in browser.find_element(By.TAG_NAME, "body").text.casefold()
    boxes = browser.find_elements(By.CSS_SELECTOR, "form#consent input[type='checkbox'][name='scope']")
    assert [b.get_attribute("value") for b in boxes] == scopes
    for n, box in enumerate(boxes):
        assert box.get_attribute("id") == f"scope-{n}"
        assert box.is_selected(), f"scope-{n} is not ticked"
        labels = browser.find_elements(By.CSS_SELECTOR, f"label[for='scope-{n}']")
        assert len(labels) == 1 and labels[0].text.strip(), f"no label explains scope-{n}"

    # The patient keeps Observations to themself.
    n = scopes.index("patient/Observation.rs")
    box = browser.find_element(By.ID, f"scope-{n}")
    try:
        box.click()
    except (ElementNotInteractableException, ElementClickInterceptedException):
        browser.find_element(By.CSS_SELECTOR, f"label[for='scope-{n}']").click()  # a styled checkbox
    assert not browser.find_element(By.ID, f"scope-{n}").is_selected()
    assert all(browser.find_element(By.ID, f"scope-{i}").is_selected() for i in range(len(scopes)) if i != n)

    shot = os.path.join(artifacts, "smart-consent.png")
    assert browser.save_screenshot(shot)
    png = png_summary(shot)
    assert png["width"] >= 800 and png["height"] >= 600, png
    assert png["bytes"] > 5_000, png  # a page, not an empty canvas
    assert png["colours"] >= 16 and png["dominant"] < 0.995, f"the consent page renders (nearly) one colour: {png}"

    browser.find_element(By.ID, "approve").click()
    q = callback_server.wait(timeout=WAIT)
    assert q.get("state") == state and q.get("code"), q
    wait.until(lambda d: d.current_url.startswith(callback_server.url))

    r = exchange_code(smart_config, q["code"], callback_server.url, verifier, cid)
    assert r.status_code == 200, r.text
    t = r.json()
    granted = set(t["scope"].split())
    assert "patient/Observation.rs" not in granted, t
    assert "patient/Patient.rs" in granted, t
    assert t["patient"] == patient_user.id, t
    token = t["access_token"]

    denied = fhir_get(smart_base, f"Observation?patient={patient_user.id}", token)
    assert denied.status_code == 403, denied.text
    assert denied.json()["resourceType"] == "OperationOutcome" and denied.json()["issue"][0]["code"] == "forbidden"
    me = fhir_get(smart_base, f"Patient/{patient_user.id}", token)
    assert me.status_code == 200 and me.json()["id"] == patient_user.id, me.text

    # Approving wrote a Consent through the ledger for exactly what was approved.
    assert t.get("consent", "").startswith("Consent/"), t
    consent_id = t["consent"].split("/", 1)[1]
    consent = smart_backend.read(t["consent"])
    assert consent["status"] == "active", consent
    assert consent["patient"]["reference"] == f"Patient/{patient_user.id}", consent
    actors = [a.get("reference", {}).get("identifier", {}) for a in consent["provision"].get("actor", [])]
    assert {"system": "urn:fhir-ledger:client", "value": cid} in [
        {"system": i.get("system"), "value": i.get("value")} for i in actors], consent
    classes = {c.get("code") for c in consent["provision"].get("class", [])}
    assert "Patient" in classes and "Observation" not in classes, consent
    recorded = " ".join(extension_values(consent, "urn:fhir-ledger:StructureDefinition/smart-scopes")).split()
    assert "patient/Patient.rs" in recorded and "patient/Observation.rs" not in recorded, consent

    # The portal, in the same browser (its fl_session cookie): the app, the report, withdraw.
    browser.get(smart_config["management_endpoint"])
    wait.until(EC.presence_of_element_located((By.ID, "access-report")))
    assert browser.find_element(By.ID, "access-report").tag_name.lower() == "table"
    # The timeline above it: the app's reads drawn (a real size in the browser), each mark
    # titled with when, how many requests and whether they were shown or refused.
    chart = browser.find_element(By.ID, "access-timeline")
    assert chart.size["width"] > 0 and chart.size["height"] > 0, chart.size
    marks = chart.find_elements(By.CSS_SELECTOR, "g.mark")
    assert any("shown" in (m.get_attribute("class") or "") for m in marks), [m.get_attribute("class") for m in marks]
    # Drawn, not just present: each row's label and each mark is displayed.
    labels = chart.find_elements(By.CSS_SELECTOR, "text.accessor")
    assert labels and all(e.is_displayed() for e in labels + marks), [e.is_displayed() for e in labels + marks]
    titles = [m.find_element(By.TAG_NAME, "title").get_attribute("textContent") for m in marks]
    assert all(re.search(r"\d+ request\(s\) (shown|refused)", t) for t in titles), titles
    assert app_name.casefold() in browser.find_element(By.TAG_NAME, "body").text.casefold()
    withdraw = wait.until(EC.element_to_be_clickable((By.ID, f"withdraw-{consent_id}")))
    form = withdraw.find_element(By.XPATH, "./ancestor::form")
    assert (form.get_attribute("method") or "").lower() == "post"
    action = urllib.parse.urlsplit(form.get_attribute("action")).path
    assert action == f"/portal/apps/{consent_id}/withdraw", action
    browser.save_screenshot(os.path.join(artifacts, "smart-portal.png"))

    withdraw.click()
    try:  # a confirm() dialog, if the page asks
        browser.switch_to.alert.accept()
    except NoAlertPresentException:
        pass
    wait.until(left_page(withdraw))

    r = wait_for_status(lambda: fhir_get(smart_base, f"Patient/{patient_user.id}", token), 401)
    assert r.status_code == 401, f"after withdrawing, the app's token still gets {r.status_code}"
    assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", ""), r.headers
    assert smart_backend.read(t["consent"])["status"] != "active"


def test_operator_console_in_browser(smart_base, smart_admin, patient_user, browser, artifacts):
    """The operator console: a sign-in with the admin token (a wrong one is refused), then the
    cluster's members, the signed tree head with its valid signature, metrics tiles, the newest
    leaves (no patient's id or name among them) and the backup just taken, each displayed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    token = os.environ["SMART_ADMIN_TOKEN"]
    # A backup to list: streamed whole in the answer to its POST ("sent whole").
    streamed = smart_admin.http.post(smart_base + "/admin/backups")
    assert streamed.status_code == 200 and streamed.content.startswith(b"FHLSNAP\0"), streamed.status_code
    backup = {"id": streamed.headers["X-Backup-Id"]}

    def sign_in(value):
        form = wait.until(EC.element_to_be_clickable((By.ID, "console-submit")))
        browser.find_element(By.ID, "token").send_keys(value)
        form.click()
        # The answer is a new page: wait until the old one is gone before looking at it.
        wait.until(left_page(form))

    browser.get(smart_base + "/console")
    sign_in("not-the-token")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "p.error")))
    assert not browser.find_elements(By.ID, "members"), "a wrong token opens nothing"
    sign_in(token)
    wait.until(EC.presence_of_element_located((By.ID, "members")))

    summary = browser.find_element(By.ID, "summary").text
    assert re.search(r"Node \d+ is leader in term \d+", summary), summary
    members = browser.find_elements(By.CSS_SELECTOR, "#members tr.member")
    assert members and all(m.is_displayed() for m in members), len(members)
    assert "leader" in members[0].text and "(this node)" in members[0].text, members[0].text
    head = browser.find_element(By.ID, "tree-head").text
    assert re.search(r"Size \d+, root [0-9a-f]{64}", head), head
    sigs = browser.find_elements(By.CSS_SELECTOR, "#tree-head tr.cosignature")
    assert sigs and all("valid, a member's key" in s.text for s in sigs), [s.text for s in sigs]
    tiles = {t.text.split("\n", 1)[1]: t.text.split("\n", 1)[0]
             for t in browser.find_elements(By.CSS_SELECTOR, "#metrics .tile") if "\n" in t.text}
    assert int(tiles["requests"]) > 0 and int(tiles["ledger leaves"]) > 0, tiles
    leaves = browser.find_elements(By.CSS_SELECTOR, "#recent-leaves tr.leaf")
    assert len(leaves) == 15 and all(l.is_displayed() for l in leaves), len(leaves)
    page = browser.find_element(By.TAG_NAME, "body").text
    assert patient_user.id not in page and patient_user.family not in page, "the page names a patient"
    backups = browser.find_elements(By.CSS_SELECTOR, "#backups tr.backup")
    assert any(backup["id"][:12] in b.text and "sent whole" in b.text for b in backups), \
        [b.text for b in backups]
    # The JSON the page links to opens with the console's session, and only to read.
    browser.get(smart_base + "/admin/backups")
    assert backup["id"] in browser.find_element(By.TAG_NAME, "body").text
    browser.get(smart_base + "/console")
    wait.until(EC.presence_of_element_located((By.ID, "recent-leaves")))
    shot = os.path.join(artifacts, "operator-console.png")
    assert browser.save_screenshot(shot)
    png = png_summary(shot)
    assert png["width"] >= 800 and png["colours"] >= 16 and png["dominant"] < 0.995, png
