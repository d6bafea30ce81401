package org.fhirledger.conformance;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.math.BigInteger;
import java.net.CookieManager;
import java.net.URI;
import java.net.URLDecoder;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.security.Signature;
import java.security.interfaces.ECPublicKey;
import java.security.spec.ECGenParameterSpec;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Gets SMART access tokens the way an app would, over plain HTTP (HAPI's client has no OAuth
 * flows): the admin API registers clients and users (src/auth/CONTRACT.md), a backend client
 * signs its ES384 client assertion with the JDK, and a patient's token comes from the
 * authorization-code flow with PKCE, its login and consent forms posted like a browser's.
 */
final class SmartAuth {
  private static final String JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
  /** Registered but never contacted: the code is read from the consent answer's Location. */
  private static final String REDIRECT_URI = "http://127.0.0.1:9/hapi-client-callback";
  private static final Base64.Encoder B64U = Base64.getUrlEncoder().withoutPadding();
  private static final SecureRandom RANDOM = new SecureRandom();

  private final String base;
  private final String adminToken;
  private final ObjectMapper json = new ObjectMapper();
  private final HttpClient http = HttpClient.newBuilder().followRedirects(HttpClient.Redirect.NEVER).build();
  final JsonNode config;

  SmartAuth(String base, String adminToken) throws IOException, InterruptedException {
    this.base = base;
    this.adminToken = adminToken;
    HttpResponse<String> r = http.send(HttpRequest.newBuilder(URI.create(base + "/.well-known/smart-configuration"))
        .GET().build(), HttpResponse.BodyHandlers.ofString());
    Checks.expect(r.statusCode() == 200, "GET /.well-known/smart-configuration: %d %s", r.statusCode(), r.body());
    config = json.readTree(r.body());
  }

  private JsonNode admin(String path, Map<String, Object> body) throws IOException, InterruptedException {
    HttpResponse<String> r = http.send(HttpRequest.newBuilder(URI.create(base + path))
        .header("Authorization", "Bearer " + adminToken)
        .header("Content-Type", "application/json")
        .POST(HttpRequest.BodyPublishers.ofString(json.writeValueAsString(body))).build(),
        HttpResponse.BodyHandlers.ofString());
    Checks.expect(r.statusCode() == 201, "POST %s: %d %s", path, r.statusCode(), r.body());
    return json.readTree(r.body());
  }

  private JsonNode tokenRequest(Map<String, String> form, String what) throws IOException, InterruptedException {
    HttpResponse<String> r = http.send(HttpRequest.newBuilder(URI.create(config.path("token_endpoint").asText()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .POST(HttpRequest.BodyPublishers.ofString(formBody(form))).build(), HttpResponse.BodyHandlers.ofString());
    Checks.expect(r.statusCode() == 200, "%s: POST /auth/token -> %d %s", what, r.statusCode(), r.body());
    JsonNode t = json.readTree(r.body());
    Checks.expect("bearer".equalsIgnoreCase(t.path("token_type").asText()) && t.hasNonNull("access_token"),
        "%s: token response %s", what, r.body());
    return t;
  }

  // ---------------------------------------------------------------------------------------
  // Backend services (client_credentials + private_key_jwt)

  /** A backend-services client with an ES384 key of its own, registered with a scope ceiling. */
  final class Backend {
    private final KeyPair key;
    private final String kid = "hapi-" + UUID.randomUUID();
    final String clientId;

    private Backend(String name, String ceiling) throws Exception {
      KeyPairGenerator gen = KeyPairGenerator.getInstance("EC");
      gen.initialize(new ECGenParameterSpec("secp384r1"));
      key = gen.generateKeyPair();
      ECPublicKey pub = (ECPublicKey) key.getPublic();
      Map<String, Object> jwk = new LinkedHashMap<>();
      jwk.put("kty", "EC");
      jwk.put("crv", "P-384");
      jwk.put("x", B64U.encodeToString(fixed(pub.getW().getAffineX(), 48)));
      jwk.put("y", B64U.encodeToString(fixed(pub.getW().getAffineY(), 48)));
      jwk.put("kid", kid);
      jwk.put("alg", "ES384");
      jwk.put("use", "sig");
      Map<String, Object> body = new LinkedHashMap<>();
      body.put("client_name", name);
      // The contract wants a redirect URI for every client; a backend never uses it.
      body.put("redirect_uris", List.of(REDIRECT_URI));
      body.put("token_endpoint_auth_method", "private_key_jwt");
      body.put("scope", ceiling);
      body.put("jwks", Map.of("keys", List.of(jwk)));
      clientId = admin("/admin/auth/clients", body).path("client_id").asText();
    }

    /** The token response for a fresh client assertion (a new jti each time). */
    JsonNode token(String scope) throws Exception {
      String aud = config.path("token_endpoint").asText();
      long now = System.currentTimeMillis() / 1000;
      Map<String, Object> claims = new LinkedHashMap<>();
      claims.put("iss", clientId);
      claims.put("sub", clientId);
      claims.put("aud", aud);
      claims.put("exp", now + 240);
      claims.put("iat", now);
      claims.put("jti", UUID.randomUUID().toString());
      Map<String, String> form = new LinkedHashMap<>();
      form.put("grant_type", "client_credentials");
      form.put("scope", scope);
      form.put("client_assertion_type", JWT_BEARER);
      form.put("client_assertion", sign(Map.of("alg", "ES384", "typ", "JWT", "kid", kid), claims));
      return tokenRequest(form, "client_credentials");
    }

    private String sign(Map<String, Object> header, Map<String, Object> claims) throws Exception {
      String input = B64U.encodeToString(json.writeValueAsBytes(header)) + "."
          + B64U.encodeToString(json.writeValueAsBytes(claims));
      // JWS (RFC 7518 3.4) wants r || s at fixed width: the JDK's P1363 format, not DER.
      Signature s = Signature.getInstance("SHA384withECDSAinP1363Format");
      s.initSign(key.getPrivate());
      s.update(input.getBytes(StandardCharsets.US_ASCII));
      return input + "." + B64U.encodeToString(s.sign());
    }
  }

  Backend registerBackend(String name, String ceiling) throws Exception {
    return new Backend(name, ceiling);
  }

  private static byte[] fixed(BigInteger n, int width) {
    byte[] raw = n.toByteArray();
    byte[] out = new byte[width];
    int len = Math.min(raw.length, width);
    System.arraycopy(raw, raw.length - len, out, width - len, len);
    return out;
  }

  // ---------------------------------------------------------------------------------------
  // A patient's token: authorization code + PKCE, login and consent as a browser posts them

  /** Registers a public app and a user for Patient/patientId, signs in, approves every scope. */
  JsonNode patientToken(String patientId, String scope, String run) throws Exception {
    String clientId = admin("/admin/auth/clients", Map.of("client_name", "HAPI client conformance " + run,
        "redirect_uris", List.of(REDIRECT_URI), "token_endpoint_auth_method", "none", "scope", scope))
        .path("client_id").asText();
    String username = "hapi-patient-" + run;
    String password = B64U.encodeToString(randomBytes(18));
    admin("/admin/auth/users", Map.of("username", username, "password", password, "fhirUser", "Patient/" + patientId));

    String verifier = B64U.encodeToString(randomBytes(48));
    String challenge = B64U.encodeToString(MessageDigest.getInstance("SHA-256")
        .digest(verifier.getBytes(StandardCharsets.US_ASCII)));
    String state = B64U.encodeToString(randomBytes(16));
    Map<String, String> query = new LinkedHashMap<>();
    query.put("response_type", "code");
    query.put("client_id", clientId);
    query.put("redirect_uri", REDIRECT_URI);
    query.put("scope", scope);
    query.put("state", state);
    query.put("aud", base);
    query.put("code_challenge", challenge);
    query.put("code_challenge_method", "S256");

    // A cookie jar of its own: the login sets the fl_session cookie the consent post needs.
    HttpClient browser = HttpClient.newBuilder().followRedirects(HttpClient.Redirect.NEVER)
        .cookieHandler(new CookieManager()).build();
    URI authorize = URI.create(config.path("authorization_endpoint").asText() + "?" + formBody(query));
    HttpResponse<String> page = browser.send(HttpRequest.newBuilder(authorize).GET().build(),
        HttpResponse.BodyHandlers.ofString());
    Checks.expect(page.statusCode() == 200, "GET %s: %d %s", authorize, page.statusCode(), Checks.clip(page.body(), 300));

    Form login = Form.find(page.body(), "login");
    Map<String, String> credentials = new LinkedHashMap<>();
    credentials.put("username", username);
    credentials.put("password", password);
    credentials.put("request", login.hidden("request"));
    page = post(browser, authorize.resolve(login.action), formBody(credentials));
    Checks.expect(page.statusCode() == 200, "login: %d %s", page.statusCode(), Checks.clip(page.body(), 300));

    Form consent = Form.find(page.body(), "consent");
    List<String[]> fields = new ArrayList<>();
    fields.add(new String[] {"request", consent.hidden("request")});
    fields.add(new String[] {"csrf", consent.hidden("csrf")});
    for (String s : consent.values("scope")) {
      fields.add(new String[] {"scope", s});
    }
    fields.add(new String[] {"decision", "approve"});
    StringBuilder body = new StringBuilder();
    for (String[] f : fields) {
      body.append(body.length() == 0 ? "" : "&").append(enc(f[0])).append('=').append(enc(f[1]));
    }
    page = post(browser, authorize.resolve(consent.action), body.toString());
    String location = page.headers().firstValue("Location").orElse("");
    Checks.expect((page.statusCode() == 302 || page.statusCode() == 303) && location.startsWith(REDIRECT_URI),
        "consent: %d Location %s", page.statusCode(), location);
    Map<String, String> callback = parseQuery(URI.create(location).getRawQuery());
    Checks.expect(state.equals(callback.get("state")) && callback.containsKey("code"), "callback %s", location);

    Map<String, String> exchange = new LinkedHashMap<>();
    exchange.put("grant_type", "authorization_code");
    exchange.put("code", callback.get("code"));
    exchange.put("redirect_uri", REDIRECT_URI);
    exchange.put("code_verifier", verifier);
    exchange.put("client_id", clientId);
    return tokenRequest(exchange, "authorization_code");
  }

  private static HttpResponse<String> post(HttpClient c, URI uri, String form) throws IOException, InterruptedException {
    return c.send(HttpRequest.newBuilder(uri).header("Content-Type", "application/x-www-form-urlencoded")
        .POST(HttpRequest.BodyPublishers.ofString(form)).build(), HttpResponse.BodyHandlers.ofString());
  }

  /** One HTML form: its action and its inputs' name/value/type, as the page has them. */
  private record Form(String action, List<Map<String, String>> inputs) {
    private static final Pattern FORM = Pattern.compile("(?is)<form\\b([^>]*)>(.*?)</form>");
    private static final Pattern INPUT = Pattern.compile("(?is)<input\\b([^>]*)>");
    private static final Pattern ATTR = Pattern.compile("(?s)([\\w:-]+)\\s*=\\s*(?:\"([^\"]*)\"|'([^']*)')");

    static Form find(String html, String id) {
      Matcher f = FORM.matcher(html);
      while (f.find()) {
        Map<String, String> attrs = attributes(f.group(1));
        if (id.equals(attrs.get("id"))) {
          List<Map<String, String>> inputs = new ArrayList<>();
          Matcher i = INPUT.matcher(f.group(2));
          while (i.find()) {
            inputs.add(attributes(i.group(1)));
          }
          return new Form(attrs.getOrDefault("action", ""), inputs);
        }
      }
      throw new AssertionError("no <form id=\"" + id + "\"> in: " + Checks.clip(html, 400));
    }

    String hidden(String name) {
      return inputs.stream().filter(i -> name.equals(i.get("name")) && "hidden".equalsIgnoreCase(i.get("type")))
          .map(i -> i.getOrDefault("value", "")).findFirst()
          .orElseThrow(() -> new AssertionError("no hidden input " + name + " in " + inputs));
    }

    List<String> values(String name) {
      return inputs.stream().filter(i -> name.equals(i.get("name"))).map(i -> i.getOrDefault("value", "")).toList();
    }

    private static Map<String, String> attributes(String tag) {
      Map<String, String> out = new HashMap<>();
      Matcher a = ATTR.matcher(tag);
      while (a.find()) {
        out.put(a.group(1).toLowerCase(), unescape(a.group(2) != null ? a.group(2) : a.group(3)));
      }
      return out;
    }

    private static String unescape(String s) {
      Matcher m = Pattern.compile("&(#x[0-9a-fA-F]+|#[0-9]+|amp|lt|gt|quot|apos);").matcher(s);
      StringBuilder out = new StringBuilder();
      while (m.find()) {
        String e = m.group(1);
        String r = switch (e) {
          case "amp" -> "&";
          case "lt" -> "<";
          case "gt" -> ">";
          case "quot" -> "\"";
          case "apos" -> "'";
          default -> new String(Character.toChars(e.startsWith("#x")
              ? Integer.parseInt(e.substring(2), 16) : Integer.parseInt(e.substring(1))));
        };
        m.appendReplacement(out, Matcher.quoteReplacement(r));
      }
      m.appendTail(out);
      return out.toString();
    }
  }

  private static Map<String, String> parseQuery(String raw) {
    Map<String, String> out = new HashMap<>();
    for (String pair : raw == null ? new String[0] : raw.split("&")) {
      int eq = pair.indexOf('=');
      if (eq > 0) {
        out.put(URLDecoder.decode(pair.substring(0, eq), StandardCharsets.UTF_8),
            URLDecoder.decode(pair.substring(eq + 1), StandardCharsets.UTF_8));
      }
    }
    return out;
  }

  private static String formBody(Map<String, String> form) {
    StringBuilder b = new StringBuilder();
    form.forEach((k, v) -> b.append(b.length() == 0 ? "" : "&").append(enc(k)).append('=').append(enc(v)));
    return b.toString();
  }

  private static String enc(String s) {
    return URLEncoder.encode(s, StandardCharsets.UTF_8);
  }

  private static byte[] randomBytes(int n) {
    byte[] b = new byte[n];
    RANDOM.nextBytes(b);
    return b;
  }
}
