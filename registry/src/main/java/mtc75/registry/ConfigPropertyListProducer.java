package mtc75.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

/** The bean Apicurio's config-index Quarkus extension would build (its deployment jar is not on Maven Central). */
@Singleton
public class ConfigPropertyListProducer {
    @Produces
    @Singleton
    public DynamicConfigPropertyList dynamicConfigPropertyList() {
        return new DynamicConfigPropertyList(List.of());
    }
}
