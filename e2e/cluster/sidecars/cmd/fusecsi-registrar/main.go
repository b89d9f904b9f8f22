// fusecsi-registrar registers a CSI driver's node plugin with the kubelet through the kubelet
// plugin registration API (k8s.io/kubelet/pkg/apis/pluginregistration/v1).
//
// It is a small stand-in for kubernetes-csi's node-driver-registrar, whose Go module cannot be
// fetched on fusecsi's build machines, and takes the same main flags. It asks the driver for its
// name (CSI GetPluginInfo), serves the registration service on
// <plugin-registration-path>/<driver>-reg.sock for kubelet's plugin watcher, and exits non-zero
// when kubelet reports a failed registration so that the container is restarted.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"fusecsi.local/e2e/sidecars/internal/csiconn"
)

var version = "dev"

type registrar struct {
	driver   string
	endpoint string
	failed   chan string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("kubelet registered driver %s at %s", r.driver, r.endpoint)
	} else {
		select {
		case r.failed <- s.Error:
		default:
		}
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func driverName(ctx context.Context, address string, timeout time.Duration) (string, error) {
	conn, err := csiconn.Dial(address)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	var name string
	err = csiconn.Retry(ctx, time.Second, func(err error) { log.Printf("waiting for CSI driver at %s: %v", address, err) },
		func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
			if err != nil {
				return err
			}
			if info.GetName() == "" {
				return errors.New("GetPluginInfo returned an empty name")
			}
			name = info.GetName()
			return nil
		})
	return name, err
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "CSI driver socket, as seen by this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "CSI driver socket path on the host, given to kubelet (required)")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory, as seen by this container")
	httpEndpoint := flag.String("http-endpoint", "", "serve /healthz on this address (e.g. :9809); empty: off")
	timeout := flag.Duration("timeout", 15*time.Second, "timeout of each CSI call")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("fusecsi-registrar", version)
		return
	}
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	name, err := driverName(ctx, *csiAddress, *timeout)
	if err != nil {
		log.Fatalf("cannot get the driver name: %v", err)
	}
	socket := filepath.Join(*regDir, name+"-reg.sock")
	// A socket left by a previous run would make Listen fail.
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("cannot remove stale %s: %v", socket, err)
	}
	lis, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", socket, err)
	}
	defer os.Remove(socket)

	reg := &registrar{driver: name, endpoint: *kubeletPath, failed: make(chan string, 1)}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, reg)
	go func() {
		if err := server.Serve(lis); err != nil {
			log.Printf("registration server stopped: %v", err)
			stop()
		}
	}()
	log.Printf("fusecsi-registrar %s: serving registration for %s on %s", version, name, socket)

	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		// Healthy while the registration socket exists: kubelet needs it to re-register.
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(socket); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			_, _ = w.Write([]byte("ok"))
		})
		go func() { log.Printf("health server stopped: %v", http.ListenAndServe(*httpEndpoint, mux)) }()
	}

	select {
	case <-ctx.Done():
		log.Printf("stopping")
		server.Stop()
	case msg := <-reg.failed:
		server.Stop()
		os.Remove(socket)
		log.Fatalf("kubelet failed to register driver %s: %s", name, msg)
	}
}
