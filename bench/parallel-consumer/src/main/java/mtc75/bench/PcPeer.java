package mtc75.bench;

import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.ParallelConsumerOptions.CommitMode;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.LockSupport;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * Bench figure 2's workload on Confluent Parallel Consumer: each message sleeps the time listed for
 * its offset in the work file (the same list the MTC75 run uses), UNORDERED, at most THREADS at once.
 * Prints one JSON line: elapsed from the first handler start to the last handler end.
 * Usage: PcPeer BOOTSTRAP TOPIC THREADS WORK_FILE
 */
public final class PcPeer {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String topic = args[1];
        int threads = Integer.parseInt(args[2]);
        List<String> lines = Files.readAllLines(Path.of(args[3]));
        long[] workNanos = lines.stream().mapToLong(s -> Math.round(Double.parseDouble(s) * 1e9)).toArray();
        int count = workNanos.length;

        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.GROUP_ID_CONFIG, "bench-pc-" + System.nanoTime());
        props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        KafkaConsumer<byte[], byte[]> consumer =
                new KafkaConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer());

        ParallelConsumerOptions<byte[], byte[]> options = ParallelConsumerOptions.<byte[], byte[]>builder()
                .ordering(ProcessingOrder.UNORDERED)
                .maxConcurrency(threads)
                .commitMode(CommitMode.PERIODIC_CONSUMER_ASYNCHRONOUS)
                .consumer(consumer)
                .build();
        ParallelStreamProcessor<byte[], byte[]> pc = ParallelStreamProcessor.createEosStreamProcessor(options);

        AtomicLong first = new AtomicLong(0);
        AtomicLong last = new AtomicLong(0);
        AtomicInteger done = new AtomicInteger();
        CountDownLatch finished = new CountDownLatch(1);
        pc.subscribe(List.of(topic));
        pc.poll(ctx -> {
            first.compareAndSet(0, System.nanoTime());
            long offset = ctx.offset();
            LockSupport.parkNanos(workNanos[(int) offset]);
            last.accumulateAndGet(System.nanoTime(), Math::max);
            if (done.incrementAndGet() == count) {
                finished.countDown();
            }
        });
        boolean ok = finished.await(300, TimeUnit.SECONDS);
        double elapsed = (last.get() - first.get()) / 1e9;
        pc.closeDontDrainFirst();
        System.out.printf("{\"ok\": %b, \"messages\": %d, \"handled\": %d, \"threads\": %d, \"elapsed_s\": %.4f}%n",
                ok, count, done.get(), threads, elapsed);
        System.exit(ok ? 0 : 1);
    }
}
