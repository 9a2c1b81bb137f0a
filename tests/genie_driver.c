/* A Genie driver that is not the project's code: plain C against libGenie's documented C API (loaded with dlopen,
 * prototypes as in GenieDialog.h). Usage: genie_driver <libGenie.so> <genie_config.json> <max tokens> <token>...
 * Prints the generated token ids on one line. Run it where genie-t2t-run would run: in the bundle's folder. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef int32_t Status;
typedef const void *Handle;
typedef void (*TokenCallback)(const uint32_t *tokens, uint32_t count, int sentence_code, const void *user);

static void print_tokens(const uint32_t *tokens, uint32_t count, int sentence_code, const void *user) {
  (void)sentence_code;
  (void)user;
  for (uint32_t i = 0; i < count; i++) printf("%u ", tokens[i]);
  fflush(stdout);
}

static void *need(void *lib, const char *name) {
  void *fn = dlsym(lib, name);
  if (!fn) {
    fprintf(stderr, "missing symbol %s\n", name);
    exit(2);
  }
  return fn;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s libGenie.so genie_config.json max_tokens token...\n", argv[0]);
    return 2;
  }
  void *lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) {
    fprintf(stderr, "%s\n", dlerror());
    return 2;
  }
  Status (*config_from_json)(const char *, Handle *) = need(lib, "GenieDialogConfig_createFromJson");
  Status (*dialog_create)(Handle, Handle *) = need(lib, "GenieDialog_create");
  Status (*set_max_tokens)(Handle, uint32_t) = need(lib, "GenieDialog_setMaxNumTokens");
  Status (*token_query)(Handle, const uint32_t *, uint32_t, int, TokenCallback, const void *) =
      need(lib, "GenieDialog_tokenQuery");
  Status (*dialog_free)(Handle) = need(lib, "GenieDialog_free");
  Status (*config_free)(Handle) = need(lib, "GenieDialogConfig_free");

  FILE *f = fopen(argv[2], "rb");
  if (!f) {
    perror(argv[2]);
    return 2;
  }
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *json = calloc(size + 1, 1);
  if (fread(json, 1, size, f) != (size_t)size) return 2;
  fclose(f);

  int count = argc - 4;
  uint32_t *prompt = calloc(count, sizeof(uint32_t));
  for (int i = 0; i < count; i++) prompt[i] = (uint32_t)strtoul(argv[4 + i], NULL, 10);

  Handle config = NULL, dialog = NULL;
  Status status = config_from_json(json, &config);
  if (status == 0) status = dialog_create(config, &dialog);
  if (status == 0) status = set_max_tokens(dialog, (uint32_t)atoi(argv[3]));
  if (status == 0) status = token_query(dialog, prompt, (uint32_t)count, 0, print_tokens, NULL);
  printf("\n");
  if (dialog) dialog_free(dialog);
  if (config) config_free(config);
  if (status != 0) fprintf(stderr, "Genie status %d\n", status);
  return status == 0 ? 0 : 1;
}
