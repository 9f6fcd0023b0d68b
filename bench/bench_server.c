/* Reference Modbus TCP server on libmodbus, for `make bench`: serves COUNT static registers at
 * ADDRESS (input and holding registers alike, every unit ID) to any number of clients on one
 * thread with select(), the way libmodbus' own examples do. Runs until killed.
 * Usage: bench_server HOST PORT ADDRESS COUNT
 */
#include <errno.h>
#include <modbus.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/select.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT ADDRESS COUNT\n", argv[0]);
        return 2;
    }
    int address = atoi(argv[3]), count = atoi(argv[4]);
    modbus_t *ctx = modbus_new_tcp(argv[1], atoi(argv[2]));
    modbus_mapping_t *map =
        modbus_mapping_new_start_address(0, 0, 0, 0, address, count, address, count);
    if (ctx == NULL || map == NULL) {
        fprintf(stderr, "bench_server: %s\n", modbus_strerror(errno));
        return 1;
    }
    for (int i = 0; i < count; i++)
        map->tab_input_registers[i] = map->tab_registers[i] = (uint16_t)(1000 + i);
    int server = modbus_tcp_listen(ctx, 64);
    if (server == -1) {
        fprintf(stderr, "bench_server: cannot listen: %s\n", modbus_strerror(errno));
        return 1;
    }
    fd_set all;
    FD_ZERO(&all);
    FD_SET(server, &all);
    int max_fd = server;
    uint8_t query[MODBUS_TCP_MAX_ADU_LENGTH];
    for (;;) {
        fd_set ready = all;
        if (select(max_fd + 1, &ready, NULL, NULL, NULL) == -1) {
            perror("bench_server: select");
            return 1;
        }
        for (int fd = 0; fd <= max_fd; fd++) {
            if (!FD_ISSET(fd, &ready))
                continue;
            if (fd == server) {
                int client = modbus_tcp_accept(ctx, &server);
                if (client != -1) {
                    FD_SET(client, &all);
                    if (client > max_fd)
                        max_fd = client;
                }
                continue;
            }
            modbus_set_socket(ctx, fd);
            int rc = modbus_receive(ctx, query);
            if (rc > 0) {
                modbus_reply(ctx, query, rc, map);
            } else if (rc == -1) {
                close(fd);
                FD_CLR(fd, &all);
            }
        }
    }
}
