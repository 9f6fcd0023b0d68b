/* Modbus TCP load generator on libmodbus, for `make bench` (the bench package runs it).
 *
 * CLIENTS threads, one connection each, read COUNT registers at ADDRESS back to back (function
 * code 4, or 3 with FC=3) for WARMUP + SECONDS; only requests started after the warm-up and
 * answered before the end count. Prints one line of key=value pairs (latencies in microseconds):
 *   requests=N errors=N seconds=S p50_us=X p99_us=X max_us=X
 * Usage: bench_client HOST PORT CLIENTS SECONDS WARMUP ADDRESS COUNT UNIT [FC]
 */
#include <errno.h>
#include <modbus.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *host;
static int port, address, count, unit, fc = 4;
static double start_at, end_at;

struct worker {
    pthread_t thread;
    double *latencies; /* seconds */
    size_t n, cap;
    long errors;
    int failed;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    uint16_t regs[125];
    modbus_t *ctx = modbus_new_tcp(host, port);
    if (ctx == NULL || modbus_set_slave(ctx, unit) == -1 || modbus_connect(ctx) == -1) {
        fprintf(stderr, "bench_client: cannot connect to %s:%d: %s\n", host, port,
                modbus_strerror(errno));
        w->failed = 1;
        if (ctx != NULL)
            modbus_free(ctx);
        return NULL;
    }
    modbus_set_response_timeout(ctx, 3, 0);
    for (;;) {
        double t0 = now();
        int rc = fc == 3 ? modbus_read_registers(ctx, address, count, regs)
                         : modbus_read_input_registers(ctx, address, count, regs);
        double t1 = now();
        if (t1 > end_at)
            break;
        if (t0 < start_at)
            continue;
        if (rc != count) {
            w->errors++;
            continue;
        }
        if (w->n == w->cap) {
            w->cap = w->cap ? 2 * w->cap : 65536;
            w->latencies = realloc(w->latencies, w->cap * sizeof(double));
            if (w->latencies == NULL) {
                perror("bench_client");
                exit(1);
            }
        }
        w->latencies[w->n++] = t1 - t0;
    }
    modbus_close(ctx);
    modbus_free(ctx);
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest rank, as the bench's percentile(). */
static double percentile(const double *sorted, size_t n, double q)
{
    if (n == 0)
        return 0;
    size_t rank = (size_t)(q / 100 * n + 0.999999999);
    return sorted[rank > 0 ? rank - 1 : 0];
}

int main(int argc, char **argv)
{
    if (argc < 9) {
        fprintf(stderr,
                "usage: %s HOST PORT CLIENTS SECONDS WARMUP ADDRESS COUNT UNIT [FC]\n", argv[0]);
        return 2;
    }
    host = argv[1];
    port = atoi(argv[2]);
    int clients = atoi(argv[3]);
    double seconds = atof(argv[4]), warmup = atof(argv[5]);
    address = atoi(argv[6]);
    count = atoi(argv[7]);
    unit = atoi(argv[8]);
    if (argc > 9)
        fc = atoi(argv[9]);
    if (clients < 1 || count < 1 || count > 125 || (fc != 3 && fc != 4)) {
        fprintf(stderr, "bench_client: bad arguments\n");
        return 2;
    }
    struct worker *workers = calloc(clients, sizeof *workers);
    start_at = now() + warmup;
    end_at = start_at + seconds;
    for (int i = 0; i < clients; i++)
        pthread_create(&workers[i].thread, NULL, run, &workers[i]);
    size_t total = 0;
    long errors = 0;
    int failed = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(workers[i].thread, NULL);
        total += workers[i].n;
        errors += workers[i].errors;
        failed |= workers[i].failed;
    }
    if (failed)
        return 1;
    double *all = malloc((total ? total : 1) * sizeof(double));
    size_t k = 0;
    for (int i = 0; i < clients; i++) {
        memcpy(all + k, workers[i].latencies, workers[i].n * sizeof(double));
        k += workers[i].n;
    }
    qsort(all, total, sizeof(double), by_value);
    printf("requests=%zu errors=%ld seconds=%.3f p50_us=%.1f p99_us=%.1f max_us=%.1f\n", total,
           errors, seconds, percentile(all, total, 50) * 1e6, percentile(all, total, 99) * 1e6,
           total ? all[total - 1] * 1e6 : 0.0);
    return 0;
}
