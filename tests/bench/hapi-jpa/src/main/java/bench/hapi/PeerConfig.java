package bench.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Primary;
import org.springframework.core.env.Environment;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * The beans HAPI's JPA configuration expects the application to supply. Every setting that
 * differs from HAPI's defaults is marked here and explained in README.md beside the pom.
 */
@Configuration
public class PeerConfig {

	/** Storage settings: HAPI's defaults except where noted. */
	@Bean
	public JpaStorageSettings storageSettings(Environment env) {
		JpaStorageSettings s = new JpaStorageSettings();
		// NON-DEFAULT (HAPI: true). The Synthea set that run.sh and peer.sh ingest has
		// ExplanationOfBenefit.insurer pointing to a Patient, a target type R4 does not list
		// for that element; HAPI refuses the whole bundle (422 HAPI-0931), fhir-ledger stores
		// it, so HAPI must too.
		s.setEnforceReferenceTargetTypes(env.getProperty("peer.enforce-reference-target-types", Boolean.class, false));
		// HAPI's search-result cache: a search repeated within this many ms is answered from
		// the stored result list. Default 60000 (on); peer.sh keeps the default unless told
		// (HAPI_SEARCH_CACHE_MS; 0 turns it off).
		long reuse = env.getProperty("peer.reuse-cached-search-results-ms", Long.class, 60000L);
		s.setReuseCachedSearchResultsForMillis(reuse > 0 ? reuse : null);
		return s;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings(); // partitioning off (HAPI's default)
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings(); // no subscription channel enabled (HAPI's default)
	}

	/** HAPI's own entity manager factory (its Hibernate integrator and naming), on Boot's Hikari pool. */
	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource,
			Environment env) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(dataSource);
		Properties p = new Properties();
		p.put("hibernate.dialect", "ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect");
		// Creates HAPI's tables and indexes (declared on its entities) in the empty database
		// at first start, as the hapi-fhir-jpaserver-starter does.
		p.put("hibernate.hbm2ddl.auto", env.getProperty("peer.hbm2ddl", "update"));
		p.put("hibernate.jdbc.batch_size", env.getProperty("peer.jdbc-batch-size", "20"));
		p.put("hibernate.search.enabled", "false"); // no Lucene/Elasticsearch: plain JPA search
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.cache.use_structured_entries", "false");
		p.put("hibernate.cache.use_minimal_puts", "false");
		p.put("hibernate.format_sql", "false");
		p.put("hibernate.show_sql", "false");
		p.put("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		emf.setJpaProperties(p);
		return emf;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	/** The REST layer: every resource type's provider, the system provider (transactions), paging. */
	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			JpaSystemProvider<?, ?> systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));
		// Search pages kept in the database (HFJ_SEARCH), HAPI's paging for a JPA server.
		server.setPagingProvider(pagingProvider);
		// JSON when the request has no Accept header (the driver's reads): RestfulServer's
		// default is XML, fhir-ledger answers JSON.
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer server) {
		ServletRegistrationBean<RestfulServer> reg = new ServletRegistrationBean<>(server, "/fhir/*");
		reg.setLoadOnStartup(1);
		return reg;
	}
}
