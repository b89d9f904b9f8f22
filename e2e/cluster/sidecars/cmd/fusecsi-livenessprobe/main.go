// fusecsi-livenessprobe serves an HTTP /healthz endpoint that calls the CSI Probe RPC of a driver,
// for use as the target of a container livenessProbe.
//
// It is a small stand-in for kubernetes-csi's livenessprobe, whose Go module cannot be fetched
// on fusecsi's build machines, and takes the same main flags.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"

	"fusecsi.local/e2e/sidecars/internal/csiconn"
)

var version = "dev"

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "CSI driver socket, as seen by this container")
	healthPort := flag.Int("health-port", 9808, "TCP port for /healthz (ignored when --http-endpoint is set)")
	httpEndpoint := flag.String("http-endpoint", "", "address for /healthz, e.g. 127.0.0.1:9808")
	timeout := flag.Duration("probe-timeout", time.Second, "timeout of each CSI Probe call")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("fusecsi-livenessprobe", version)
		return
	}
	addr := *httpEndpoint
	if addr == "" {
		addr = fmt.Sprintf(":%d", *healthPort)
	}

	conn, err := csiconn.Dial(*csiAddress)
	if err != nil {
		log.Fatalf("bad CSI address %q: %v", *csiAddress, err)
	}
	identity := csi.NewIdentityClient(conn)

	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *timeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			log.Printf("probe failed: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		// An unset "ready" means ready (CSI spec).
		if resp.GetReady() != nil && !resp.GetReady().GetValue() {
			http.Error(w, "driver reports not ready", http.StatusInternalServerError)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	log.Printf("fusecsi-livenessprobe %s: probing %s, serving /healthz on %s", version, *csiAddress, addr)
	log.Fatal(http.ListenAndServe(addr, mux))
}
