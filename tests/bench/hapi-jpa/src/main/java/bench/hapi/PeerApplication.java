package bench.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.context.annotation.Import;

/**
 * A HAPI FHIR JPA server (R4) for tests/bench/peer.sh: HAPI's own JPA configuration
 * (JpaR4Config, HapiJpaConfig, ThreadPoolFactoryConfig; the batch job
 * framework JpaBatch2Config and Batch2JobsConfig that its services need, with the in-memory
 * message channels of SubscriptionChannelConfig, as on a single node) plus {@link PeerConfig},
 * served by Spring Boot's embedded Tomcat at /fhir. Settings come from application.properties and the command line.
 */
@SpringBootApplication
@Import({JpaR4Config.class, HapiJpaConfig.class, ThreadPoolFactoryConfig.class,
	JpaBatch2Config.class, Batch2JobsConfig.class, SubscriptionChannelConfig.class, PeerConfig.class})
public class PeerApplication {
	public static void main(String[] args) {
		long start = System.nanoTime();
		SpringApplication.run(PeerApplication.class, args);
		// peer.sh waits for this line.
		System.out.printf("hapi-jpa-peer: started in %.1f s%n", (System.nanoTime() - start) / 1e9);
	}
}
