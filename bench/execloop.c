/* Times N fork+execve+wait of a program (default /bin/true), one by one,
 * and prints "median_us p99_us mean_us". Used by bench/gate.sh inside and
 * outside sandboxes. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    char *prog = argc > 2 ? argv[2] : "/bin/true";
    double *t = malloc(sizeof(double) * n), sum = 0;
    char *args[] = {prog, NULL};
    char *env[] = {"PATH=/usr/bin:/bin", NULL};
    for (int i = 0; i < n; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        pid_t p = fork();
        if (p == 0) {
            execve(prog, args, env);
            _exit(127);
        }
        int st;
        waitpid(p, &st, 0);
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "run %d of %s failed\n", i, prog);
            return 1;
        }
        t[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
        sum += t[i];
    }
    qsort(t, n, sizeof(double), cmp);
    printf("%.1f %.1f %.1f\n", t[n / 2], t[(int)((n - 1) * 0.99)], sum / n);
    return 0;
}
